#!/usr/bin/env bash
# GPU smoke test (bench/gpu_smoke.py): one-epoch CUDA training of every family, GPU scoring actors and a
# GPU Serve replica. Needs a CUDA build of torch 2.13 in the environment it runs in, e.g.
#   python3 -m venv .venv-gpu && .venv-gpu/bin/pip install torch==2.13.0 && .venv-gpu/bin/pip install -e .
#   PY=.venv-gpu/bin/python bash bench/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" || exit 2
exec "$PY" bench/gpu_smoke.py "$@"
