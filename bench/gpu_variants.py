"""Kernel variants side by side on the GPU machine (how docs/CUDA.md's GEMV tables were measured).

A variant is a folder of files that replace the installed package's `csrc/cuda/` files of the same
name (e.g. a `qgemv.cu` with one constant changed). Each variant is built in its own copy of the
package and build folder (in parallel), then timed one after another in one process each, the same
way as `bench/gpu_bench.py` times (a CUDA graph of 100 calls rotating over 8 weight copies):

    python3 bench/gpu_variants.py DIR [DIR ...] [--decode] [--rounds 2]

prints, per variant and round, the four GEMV shapes, the two projection groups (µs), each shape's
relative error against the dequantized weights, and with --decode the Llama-3-8B-shaped decode
tok/s. `TRIMTAB_BLOCKS=2,4` sets the grid policy (blocks per multiprocessor for small, large layers).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def installed_package() -> Path:
    out = subprocess.run([sys.executable, "-c", "import trimtab, os; print(os.path.dirname(trimtab.__file__))"],
                         capture_output=True, text=True, check=True, cwd="/tmp")
    return Path(out.stdout.strip())


def variant_env(name: str) -> dict:
    root = Path("/tmp/trimtab_variants") / name
    env = dict(os.environ, TRIMTAB_BUILD_DIR=str(root / "build"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "pkg"), env.get("PYTHONPATH")]))
    return env


def prepare(folder: Path, package: Path) -> subprocess.Popen:
    """Copy the package, put the variant's files in, and start building it."""
    root = Path("/tmp/trimtab_variants") / folder.name
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(package, root / "pkg" / "trimtab")
    for source in folder.iterdir():
        shutil.copy(source, root / "pkg" / "trimtab" / "csrc" / "cuda" / source.name)
    return subprocess.Popen([sys.executable, "-c", "from trimtab.backend import cuda_ops; cuda_ops.load_extension()"],
                            env=variant_env(folder.name), cwd="/tmp", stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def time_here(name: str, decode: bool) -> None:
    """In the variant's own process: its figures, one line."""
    sys.path.insert(0, str(BENCH))
    import torch
    import gpu_bench as gb
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear

    if os.environ.get("TRIMTAB_BLOCKS"):
        small, large = map(int, os.environ["TRIMTAB_BLOCKS"].split(","))
        CudaPackedLinear.blocks_per_multiprocessor, CudaPackedLinear.large_blocks_per_multiprocessor = small, large
    row, errors = [], []
    for shape, (k, n) in gb.SHAPES.items():
        layers = gb.gemv_copies(torch, k, n)
        x = torch.randn(1, k, dtype=torch.half, device="cuda")
        errors.append(f"{gb.gemv_error_vs_dequantize(torch, layers[0], x):.1e}")
        row.append(f"{shape} {gb.time_graph(torch, gb.rotating_gemv_calls(layers, x)) * 1e6:.2f}")
    for group, shapes in gb.GROUPS.items():
        x = torch.randn(1, shapes[0][0], dtype=torch.half, device="cuda")
        copies = [list(layers) for layers in zip(*(gb.gemv_copies(torch, k, n) for k, n in shapes))]
        row.append(f"{group} {gb.time_graph(torch, gb.rotating_gemv_calls(copies, x)) * 1e6:.2f}")
    line = f"{name}: " + " | ".join(row) + " | error " + " ".join(errors)
    if decode:
        figures = gb.measure_model(gb.llama3_8b_model(True), 1024, decode_tokens=48)
        line += f" | decode {figures['decode_tok_s']:.1f} tok/s, graph {figures['graph_step_ms']:.3f} ms"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", type=Path, help="folders of csrc/cuda files")
    parser.add_argument("--decode", action="store_true", help="also the decode tok/s of a Llama-3-8B shape")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--time-here", help=argparse.SUPPRESS)  # internal: run in the variant's process
    args = parser.parse_args()
    if args.time_here:
        return time_here(args.time_here, args.decode)
    missing = [str(v) for v in args.variants if not v.is_dir()]
    if missing:
        sys.exit(f"gpu_variants: not a folder: {', '.join(missing)}")
    package = installed_package()
    if not (package / "csrc" / "cuda").is_dir():  # an editable install keeps csrc/ outside the package
        sys.exit(f"gpu_variants: {package} has no csrc/cuda/: install trimtab as a package (pip install .)")
    sources = {f.name for f in (package / "csrc" / "cuda").iterdir()}
    strays = [str(f) for v in args.variants for f in v.iterdir() if f.name not in sources]
    if strays:  # a misspelt name would be copied beside the sources and never built
        sys.exit(f"gpu_variants: not a file of csrc/cuda/: {', '.join(strays)}")
    builds = {v.name: prepare(v, package) for v in args.variants}
    for name, build in builds.items():
        if build.wait():
            sys.exit(f"gpu_variants: {name} did not build:\n{build.stderr.read()[-2000:]}")
    for _ in range(args.rounds):
        for v in args.variants:
            command = [sys.executable, __file__, str(v), "--time-here", v.name] + (["--decode"] if args.decode else [])
            subprocess.run(command, env=variant_env(v.name), check=False)


if __name__ == "__main__":
    main()
