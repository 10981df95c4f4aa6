#!/usr/bin/env bash
# The full test suite (slow end-to-end tests included). Arguments go to pytest, e.g. `-m "not slow"`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ISC_ROOT"
exec python -m pytest "$@"
