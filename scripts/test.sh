#!/usr/bin/env bash
# Set up and run the whole test suite (the README's test command; CI calls it).
#   scripts/test.sh            every test except the slow ones
#   scripts/test.sh --slow     only the slow ones (fresh-clone setup, long TVM tuning, ...)
#   scripts/test.sh -k name    extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/bootstrap.sh
# The service tests start their own redis-server processes; the browser tests drive Debian's Chromium
# headless. Install what is missing (root on Debian).
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing ${need[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  (apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; })
fi
# Tests start their own Redis servers and Celery workers on free ports (see tests/services.py);
# the machine's Redis is never touched.
mark="not slow"
if [ "${1:-}" = "--slow" ]; then mark="slow"; shift; fi
set +e
python -m pytest -m "$mark" "$@"
rc=$?
set -e
# pytest exits 5 when no test was selected (e.g. no slow test exists yet): not a failure of the suite
[ $rc -eq 5 ] && { echo "no tests selected"; exit 0; }
exit $rc
