#!/usr/bin/env bash
# Optional GPU extra: MegaBlocks' grouped GEMM for `experts.backend: megablocks`.
# MegaBlocks pins an old torch, so it is installed without its dependencies and built against
# the torch already in .venv (needs CUDA and a compiler). Not part of `make test`/`make quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'megablocks needs a CUDA GPU and a CUDA build of torch')"
"$PY" -m pip install --no-deps --no-build-isolation megablocks==0.10.0 grouped_gemm==0.3.0 stanford-stk==0.7.1
"$PY" -c "from experts.backends import unavailable_reason; r = unavailable_reason('megablocks'); print(r or 'megablocks backend ready')"
