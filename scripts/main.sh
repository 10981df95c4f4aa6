#!/usr/bin/env bash
# The main job: data -> training stages -> extract -> postprocess -> evaluate -> tune -> promote -> search.
# Extra arguments are passed to `mlflow run`, e.g. `-P profile=full -P data=/data/disc21`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ISC_ROOT"
exec mlflow run . -e main --env-manager local --experiment-name "${MLFLOW_EXPERIMENT_NAME:-isc}" "$@"
