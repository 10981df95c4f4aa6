#!/usr/bin/env bash
# The main job: data -> training stages -> extract -> postprocess -> evaluate -> tune -> promote -> search.
# Extra arguments are passed to `mlflow run`, e.g. `-P profile=full -P data=/data/disc21`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ISC_ROOT"
# Create the store and the experiment ourselves, with an absolute artifact root under the project:
# `mlflow run` would otherwise create the experiment with a ./mlruns artifact location.
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$ISC_ROOT/mlflow.db}"
export MLFLOW_EXPERIMENT_NAME="${MLFLOW_EXPERIMENT_NAME:-isc}"
# The name travels as argv, never inside the Python source: a quote in it must not be code.
python -c "import sys; from isc.tracking import configure, get_or_create_experiment as g; configure(); g(sys.argv[1])" "$MLFLOW_EXPERIMENT_NAME"
exec mlflow run . -e main --env-manager local --experiment-name "$MLFLOW_EXPERIMENT_NAME" "$@"
