#!/usr/bin/env bash
# Gather, where a package index is reachable, the wheels that bench/gpu_suite.py needs on a bare
# GPU machine (Python 3.12, torch, transformers, safetensors; no network, no Ray, no DeepSpeed),
# into a folder the checkout carries there (default wheels/gpu, git-ignored). The suite installs
# them offline into a temporary folder (`--wheels`); the machine's torch is never touched.
#
#   bash scripts/gpu_wheels.sh [DIR]          # cp312, manylinux x86_64 (the GPU image)
#   GPU_PYTHON_VERSION=3.11 bash scripts/gpu_wheels.sh /tmp/w311   # for another Python
#
# What is gathered, and why (the image is assumed to have torch and its dependencies, and
# transformers with its own: numpy, packaging, pyyaml, tqdm, regex, tokenizers, safetensors,
# huggingface-hub, typer/rich/pygments; not psutil, pydantic, hjson, py-cpuinfo, msgpack, einops):
#   deepspeed      sdist-only on PyPI: built here as a pure-Python wheel (DS_BUILD_OPS=0; its ops,
#                  none of which we use, would JIT-compile and need ninja and nvcc)
#   psutil hjson py-cpuinfo pydantic (+ pydantic-core, annotated-types, typing-inspection,
#   typing-extensions)   imported by `import deepspeed` or by deepspeed.initialize
#   msgpack einops       imported by `import deepspeed` (its pipeline and sequence modules)
#   pytest pluggy iniconfig pygments pytest-timeout   the suite's experts_cuda_tests case
# Versions: those of this checkout's .venv (what the CPU suite tests), else the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-wheels/gpu}
PYV=${GPU_PYTHON_VERSION:-3.12}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
ABI="cp${PYV/./}"
DEEPSPEED=${DEEPSPEED_VERSION:-0.19.8}  # pyproject: deepspeed>=0.19,<0.20; the version the suite is tested with
BINARY=(psutil hjson py-cpuinfo pydantic pydantic-core annotated-types typing-inspection typing-extensions
        msgpack einops pytest pluggy iniconfig pygments pytest-timeout)

pinned() {  # NAME==VERSION as installed in $PY's environment, else NAME
  "$PY" - "$1" <<'EOF'
import importlib.metadata as m, sys
try:
    print(f"{sys.argv[1]}=={m.version(sys.argv[1])}")
except m.PackageNotFoundError:
    print(sys.argv[1])
EOF
}

mkdir -p "$OUT"
rm -f "$OUT"/*.whl
reqs=()
for name in "${BINARY[@]}"; do reqs+=("$(pinned "$name")"); done
echo "[gpu_wheels] downloading for CPython $PYV (manylinux x86_64): ${reqs[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --abi "$ABI" --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d "$OUT" "${reqs[@]}"

echo "[gpu_wheels] building deepspeed==$DEEPSPEED as a pure-Python wheel (DS_BUILD_OPS=0)"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# No build isolation: DeepSpeed's setup.py imports torch (this environment's) to describe itself;
# with no op built, the wheel holds Python files only and is tagged py3-none-any.
DS_BUILD_OPS=0 DS_BUILD_STRING="" "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary deepspeed \
  -w "$build" "deepspeed==$DEEPSPEED"
for w in "$build"/deepspeed-*.whl; do
  case "$w" in *-py3-none-any.whl) ;; *) echo "[gpu_wheels] not a pure-Python wheel: $w" >&2; exit 1 ;; esac
  cp "$w" "$OUT"/
done

total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
ls -1 "$OUT"/*.whl | sed 's|.*/|  |'
echo "[gpu_wheels] $(ls "$OUT"/*.whl | wc -l) wheels, $((total / 1024 / 1024)) MiB ($total bytes) in $OUT"
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
  echo "[gpu_wheels] over the 60 MB a GPU machine's checkout may carry" >&2
  exit 1
fi
