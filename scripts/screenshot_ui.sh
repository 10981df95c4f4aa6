#!/usr/bin/env bash
# Screenshot of the MLflow UI comparing the main job's evaluation runs (docs/img/mlflow_ui.png), taken by a
# real headless Chromium against a real local `mlflow server` on the project's default store.
# Needs Debian's chromium (apt-get install chromium). Usage: bash scripts/screenshot_ui.sh [experiment]
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ISC_ROOT"
EXP="${1:-isc}"
PORT="${PORT:-5077}"
URI="${MLFLOW_TRACKING_URI:-sqlite:///$ISC_ROOT/mlflow.db}"
mlflow server --backend-store-uri "$URI" --host 127.0.0.1 --port "$PORT" --workers 1 >/tmp/isc-ui-server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 90); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
# The evaluation runs of the newest main job, best first.
read -r exp_id runs < <(MLFLOW_TRACKING_URI="$URI" python - "$EXP" <<'PY'
import json, sys
from mlflow import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name(sys.argv[1])
runs = c.search_runs([exp.experiment_id], "tags.`isc.step` = 'evaluate' and attributes.status = 'FINISHED'",
                     order_by=["attributes.start_time DESC"], max_results=4)
print(exp.experiment_id, json.dumps([r.info.run_id for r in runs], separators=(",", ":")))
PY
)
mkdir -p docs/img
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1600,1300 \
  --virtual-time-budget=20000 --screenshot="$ISC_ROOT/docs/img/mlflow_ui.png" \
  "http://127.0.0.1:$PORT/#/compare-runs?runs=$runs&experiments=[\"$exp_id\"]"
echo "wrote docs/img/mlflow_ui.png"
