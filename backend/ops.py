"""trimtab's compiled ops, built from ``csrc/`` on first use.

    from trimtab.backend import ops
    y = ops.rms_norm(x, weight, eps)                                  # x: [..., D]
    q = ops.rotary_embedding(q, positions, inv_freq, attention_scaling=1.0, interleaved=False)
    packed = ops.qlinear_pack(qweight, scales, mins, group_bits, group_sizes)   # canonical → CPU layout
    y = ops.qlinear(x, packed, group_bits, group_sizes, perm, bias, out_features)  # x: [..., in]

Building. The first call compiles ``csrc/*.cpp`` with ``torch.utils.cpp_extension.load``
(JIT, ninja; about a minute) and loads the library, which registers ``torch.ops.trimtab.*``.
The result is cached on disk, so later processes only load it (well under a second). The
cache lives in ``$TRIMTAB_BUILD_DIR`` if set, else in torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), one folder per build.
The sources are found through the ``trimtab.csrc`` package, where they ship as package data.

SIMD choice. The engine is compiled for the machine it runs on (``-O3 -march=native``) rather
than for a portable baseline: AVX2/FMA/F16C (or whatever the host has) are then available to
every kernel without runtime dispatch code, and a JIT build happens on the host anyway. The
price is that a binary is only valid on CPUs with the same instruction sets, so the cached
build's name carries a short hash of the host CPU's ISA flags (``/proc/cpuinfo``, else the
platform's description) together with the sources, compiler flags, torch and Python
versions. A cache shared between machines (a network home, a container image) therefore
never loads a binary built for another CPU: each CPU kind gets its own build.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from . import reference_ops
from .errors import TrimtabError

__all__ = ["load_extension", "rms_norm", "rotary_embedding", "qlinear_pack", "qlinear", "qlinear_dequantize_rows"]



def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm with HF LlamaRMSNorm semantics. x: [..., D], weight: [D] -> [..., D] in x's dtype."""
    if x.device.type != "cpu":  # no compiled kernel for this device yet: the PyTorch reference runs there
        return reference_ops.rms_norm_reference(x, weight, eps)
    load_extension()
    return torch.ops.trimtab.rms_norm(x, weight, eps)


def rotary_embedding(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotary position embedding, out of place.

    x: [B, S, H, D]; positions: [B, S] int64; inv_freq: [R/2] float32 with R <= D (only the
    first R dims of each head rotate). interleaved=False pairs (i, i + R/2) as HF's
    rotate_half; interleaved=True pairs (2i, 2i + 1) as GPT-J and GGUF.
    """
    if x.device.type != "cpu":  # no compiled kernel for this device yet: the PyTorch reference runs there
        return reference_ops.rotary_embedding_reference(x, positions, inv_freq, attention_scaling, interleaved)
    load_extension()
    return torch.ops.trimtab.rotary_embedding(x, positions, inv_freq, attention_scaling, interleaved)


def qlinear_pack(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_bits: torch.Tensor,
                 group_sizes: torch.Tensor) -> torch.Tensor:
    """A canonical quantized layer (backend/quant/format.py) → the CPU kernels' packed layout.

    qweight: int32 [packed_rows, out]; scales, mins: float16 [groups, out]; group_bits: uint8
    [groups]; group_sizes: int32 [groups] → uint8 [ceil(out / 8), tile_bytes] (docs/CSRC.md).
    """
    load_extension()
    with _as_trimtab_error():
        return torch.ops.trimtab.qlinear_pack(qweight, scales, mins, group_bits, group_sizes)


def qlinear(x: torch.Tensor, packed: torch.Tensor, group_bits: torch.Tensor, group_sizes: torch.Tensor,
            perm: torch.Tensor | None, bias: torch.Tensor | None, out_features: int,
            kernel: str = "auto") -> torch.Tensor:
    """y = x[..., perm] Wqᵀ + bias for a packed quantized W. x: [..., in] → [..., out] in x's dtype.

    kernel: "auto" (the measured best: int8 with AVX2, else scalar or dequant by batch size),
    "int8" (activations quantized to int8 per 32 rows, integer dot products), "fp32" (exact),
    "scalar" (plain C++) or "dequant" (fp32 chunks of W and torch's matmul). docs/CSRC.md.
    """
    load_extension()
    with _as_trimtab_error():
        return torch.ops.trimtab.qlinear(x, packed, group_bits, group_sizes, perm, bias, out_features, kernel)


def qlinear_dequantize_rows(packed: torch.Tensor, group_bits: torch.Tensor, group_sizes: torch.Tensor,
                            perm: torch.Tensor | None, out_features: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a packed W [out, in]: rows int64 [n] → float32 [n, in] in the original input order."""
    load_extension()
    with _as_trimtab_error():
        return torch.ops.trimtab.qlinear_dequantize_rows(packed, group_bits, group_sizes, perm, out_features, rows)


@contextlib.contextmanager
def as_trimtab_error(namespace: str = "trimtab"):
    """The C++ checks' RuntimeError ("<namespace>::<op>: <problem>") as a TrimtabError."""
    marker = namespace + "::"
    try:
        yield
    except RuntimeError as exc:
        message = str(exc)
        if marker not in message:
            raise
        first = next((line for line in message.splitlines() if marker in line), message)
        raise TrimtabError(first[first.index(marker):].strip()) from None


_as_trimtab_error = as_trimtab_error


class OnceBuilt:
    """A library built and loaded on first use, once per process (a failed build is not retried)."""

    def __init__(self, build_and_load):
        self._build_and_load = build_and_load
        self._lock = threading.Lock()
        self.path: Path | None = None
        self._error: TrimtabError | None = None

    def __call__(self) -> Path:
        if self.path is not None:
            return self.path
        with self._lock:
            if self.path is None:
                if self._error is not None:
                    raise self._error
                try:
                    self.path = self._build_and_load()
                except TrimtabError as exc:
                    self._error = exc
                    raise
        return self.path


def load_extension() -> Path:
    """Build (first use only) and load the CPU engine; returns the loaded library's path."""
    return _cpu_engine()


# ---- building ------------------------------------------------------------------------


def _build_and_load() -> Path:
    sources = _source_files()
    cflags, ldflags = _compiler_flags()
    name = "trimtab_cpu_" + _build_hash(sources, cflags + ldflags)
    build_dir = _build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"  # torch's LIB_EXT

    # The name pins sources, flags and CPU, so an existing library is the right one: load it
    # directly (~1 ms) instead of asking torch/ninja to confirm it is up to date (~200 ms).
    # torch's "lock" file means another process is building it right now: wait for that.
    if library.exists() and not (build_dir / "lock").exists():
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as exc:
            raise TrimtabError(f"{library}: cannot load the cached CPU engine ({exc}); "
                               f"delete {build_dir} to rebuild it") from exc
        return library

    _check_build_tools()
    first_build = not library.exists()
    if first_build:
        print("trimtab: compiling the CPU engine (first use only, about a minute)...",
              file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        from torch.utils import cpp_extension  # imports setuptools (~0.25 s): only when building

        with exclusive_build(build_dir):
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in sources if s.suffix == ".cpp"],
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                build_directory=str(build_dir),
                is_python_module=False,  # the library only registers torch.ops.trimtab.*
                verbose=False,
            )
    except Exception as exc:  # compile, link or load: torch's message carries the compiler output
        raise _build_failure(exc, build_dir) from exc
    if first_build:
        print(f"trimtab: CPU engine compiled in {time.perf_counter() - started:.0f} s ({build_dir})",
              file=sys.stderr, flush=True)
    return library


def _source_files() -> list[Path]:
    """csrc/*.cpp and *.h, from the installed `trimtab.csrc` package (sorted: stable hash)."""
    package = importlib.resources.files("trimtab.csrc")
    try:
        root = Path(os.fspath(package))
    except TypeError:
        raise TrimtabError(
            f"trimtab's C++ sources are not on the file system ({package}); "
            "install trimtab unzipped so that the compiler can read them") from None
    sources = sorted(p for p in root.iterdir() if p.suffix in (".cpp", ".h"))
    if not any(p.suffix == ".cpp" for p in sources):
        raise TrimtabError(f"{root}: no C++ sources (csrc/*.cpp) found; the trimtab install is incomplete")
    return sources


def _compiler_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) targeting the host CPU."""
    if sys.platform == "win32":
        return ["/O2"], []
    cflags = ["-O3"]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        cflags.append("-march=native")
    elif machine in ("aarch64", "arm64"):
        cflags.append("-mcpu=native")
    ldflags: list[str] = []
    # at::parallel_for only runs in parallel when compiled with OpenMP (torch's own backend on
    # Linux); the library then shares torch's already-loaded libgomp and its thread count.
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _host_isa() -> str:
    """The host CPU's instruction-set flags, as one normalised string."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return " ".join(sorted(value.split()))
    return f"{platform.machine()} {platform.processor()} {platform.platform()}"


def _build_hash(sources: list[Path], flags: list[str]) -> str:
    """Short hash naming one build: host ISA, sources (headers too), flags, torch, Python."""
    digest = hashlib.sha256()
    for part in (_host_isa(), torch.__version__, sys.implementation.cache_tag,
                 os.environ.get("CXX", ""), " ".join(flags)):
        digest.update(part.encode() + b"\0")
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _build_root() -> Path:
    custom = os.environ.get("TRIMTAB_BUILD_DIR")
    if custom:
        return Path(custom).expanduser()
    torch_root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if torch_root:
        return Path(torch_root)
    # What torch.utils.cpp_extension.get_default_build_root() returns, without importing
    # cpp_extension and with it setuptools, which would triple the cost of a cached load.
    from torch import _appdirs

    return Path(os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions")))


@contextlib.contextmanager
def exclusive_build(build_dir: Path):
    """Build in build_dir while holding an OS lock on build_dir/trimtab.lock, which the OS releases if
    the process dies. torch's own `lock` file stays behind when a build is killed (Ctrl-C, a timeout),
    and every later build would wait for it forever; under the OS lock no other trimtab build can be
    running, so a `lock` file found there is such a leftover and is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    with open(build_dir / "trimtab.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process building this: wait for it
        try:
            leftover = build_dir / "lock"
            if leftover.exists():
                print(f"trimtab: removing {leftover}, left by an interrupted build", file=sys.stderr, flush=True)
                leftover.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_build_tools() -> None:
    """Fail early, naming the missing tool, rather than through torch's build log."""
    compiler = os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")  # as torch picks it
    if shutil.which(compiler) is None:
        raise TrimtabError(f"trimtab needs a C++ compiler to build its CPU engine and found none "
                           f"(looked for {compiler!r} on PATH): install g++ or clang++, or set CXX")
    if shutil.which("ninja") is None:
        # torch runs `ninja` from PATH; the pip package may sit in a venv that is not activated.
        try:
            import ninja
        except ImportError:
            raise TrimtabError("trimtab needs the ninja build tool to build its CPU engine: "
                               "pip install ninja") from None
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build_failure(exc: Exception, build_dir: Path) -> TrimtabError:
    """A TrimtabError with the compiler's first error; its full output goes to build.log."""
    log = build_dir / "build.log"
    try:
        log.write_text(f"{type(exc).__name__}: {exc}\n")
        where = f"full compiler output: {log}"
    except OSError:
        where = f"compiler output:\n{exc}"
    first_error = _first_error_line(str(exc)) or type(exc).__name__
    return TrimtabError(f"trimtab could not build its CPU engine: {first_error}; {where}")


def _first_error_line(output: str) -> str:
    """The compiler's first `error:` line (the one worth reading), else the first line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("Error building")]
    return (errors or lines or [""])[0][:300]


_cpu_engine = OnceBuilt(_build_and_load)
