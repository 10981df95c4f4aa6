#!/usr/bin/env bash
# The full test suite (slow end-to-end tests included). Arguments go to pytest, e.g. `-m "not slow"`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
# tests/test_concurrency.py needs a PostgreSQL server binary (initdb/pg_ctl); fresh CI machines may
# lack it. Install it when we can (root + apt), otherwise those tests skip with a reason.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[isc] installing PostgreSQL for the concurrency tests" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 || echo "[isc] PostgreSQL install failed" >&2
  else
    echo "[isc] no PostgreSQL server binaries: PostgreSQL tests will be skipped" >&2
  fi
fi
cd "$ISC_ROOT"
exec python -m pytest "$@"
