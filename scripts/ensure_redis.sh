#!/usr/bin/env bash
# Make sure a Redis answers at $REDIS_URL (default redis://127.0.0.1:6379/0); start one if none does.
set -euo pipefail
url="${REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${url#redis://}"; hostport="${hostport%%/*}"; hostport="${hostport##*@}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$host" ] && port=6379
ping() { (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
if ping; then echo "[redis] running at $host:$port"; exit 0; fi
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[redis] installing redis-server (apt)"
    (apt-get install -y -qq redis-server >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; })
  else
    echo "[redis] no Redis at $host:$port and redis-server is not installed: install Redis or set REDIS_URL" >&2
    exit 1
  fi
fi
case "$host" in 127.0.0.1|localhost) ;; *) echo "[redis] $host:$port does not answer (remote Redis: start it there)" >&2; exit 1;; esac
mkdir -p "${REDIS_DIR:-$PWD/var/redis}"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --dir "${REDIS_DIR:-$PWD/var/redis}" --logfile "${REDIS_DIR:-$PWD/var/redis}/redis.log"
for _ in $(seq 50); do ping && { echo "[redis] started at $host:$port"; exit 0; }; sleep 0.1; done
echo "[redis] failed to start on port $port (see var/redis/redis.log)" >&2; exit 1
