#!/usr/bin/env bash
# The recipe's bill (bench/recipe_bill.py): every stage at its real size and per-GPU batch, extraction of
# 2M images, kNN of 50k x 1M; projected hours of the whole recipe for 1, 4, 8 GPUs.
#   bash bench/recipe_bill.sh            # on a GPU box (real EfficientNetV2-M, AMP, SyncBN, views)
#   bash bench/recipe_bill.sh --smoke    # toy sizes on the CPU (tests/test_recipe_bill.py runs this)
# Wheels the GPU box lacks (faiss-cpu, augly and its dependencies for the views) travel in .whl/ and are
# installed into a private folder, as for bench/gpu_check.sh. PYTHON picks the interpreter (default
# python3); GPU_CHECK_SKIP_WHEELS=1 skips the install.
set -euo pipefail
source "$(dirname "$0")/bench_env.sh"
exec $PY bench/recipe_bill.py "$@"
