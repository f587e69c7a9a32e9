#!/usr/bin/env bash
# Set up and run the studio: virtualenv + pinned requirements, Redis, database, first user, then the web
# server (daphne), a search worker, a device worker and the reaper as children. Ctrl-C stops them all.
#   scripts/run.sh                 http://127.0.0.1:8000/
#   PORT=9000 HOST=0.0.0.0 scripts/run.sh
# Settings come from the environment (docs/operations.md): DATABASE_URL, REDIS_URL, SECRET_KEY, DEBUG, ...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/bootstrap.sh
export DJANGO_SETTINGS_MODULE=webapp.settings
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
VAR="${VAR_DIR:-$ROOT/var}"
LOGS="${LOG_DIR:-$VAR/logs}"
mkdir -p "$LOGS"

bash scripts/ensure_redis.sh
python manage.py migrate --noinput
python manage.py sync_targets || echo "[targets] built-in target settings not refreshed (see above)"
python manage.py ensure_first_user

if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
  echo "[web] port $PORT on $HOST is already in use: stop what runs there or set PORT=..." >&2
  exit 1
fi

names=(); pids=()
start() {  # start NAME CMD...: a child whose output goes to var/logs/NAME.log
  local name="$1"; shift
  "$@" >>"$LOGS/$name.log" 2>&1 &
  names+=("$name"); pids+=("$!")
}
stop_all() {
  trap - INT TERM EXIT
  echo; echo "[run] stopping: ${names[*]}"
  for i in "${!pids[@]}"; do
    # Workers get SIGQUIT (Celery's cold shutdown): a search is not waited for; its task message stays
    # unacknowledged and the next start resumes the run from its last checkpoint.
    case "${names[$i]}" in worker|devices) sig=QUIT ;; *) sig=TERM ;; esac
    kill -s "$sig" "${pids[$i]}" 2>/dev/null || true
  done
  for _ in $(seq 100); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap stop_all INT TERM EXIT

start web daphne -b "$HOST" -p "$PORT" webapp.asgi:application
start worker celery -A workers.celery_app worker -Q celery -c 1 -n "search@%h" --without-gossip --without-mingle -l info
start devices env WORKER_FOLLOW_TARGETS=1 celery -A workers.celery_app worker -Q quick -c 1 -n "devices@%h" \
  --without-gossip --without-mingle -l info
start reaper python manage.py reap_runs --every 30

for _ in $(seq 100); do (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null && break; sleep 0.2; done
echo
echo "  Compression studio is running:  http://$HOST:$PORT/"
if [ -f "$VAR/first_user.txt" ]; then echo "  First login: see $VAR/first_user.txt"; fi
echo "  Logs: $LOGS/{web,worker,devices,reaper}.log      Stop: Ctrl-C"
echo

set +e
wait -n "${pids[@]}"
for i in "${!pids[@]}"; do
  if ! kill -0 "${pids[$i]}" 2>/dev/null; then
    echo "[run] ${names[$i]} stopped; last lines of $LOGS/${names[$i]}.log:" >&2
    tail -n 20 "$LOGS/${names[$i]}.log" >&2
  fi
done
exit 1
