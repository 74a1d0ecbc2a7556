#!/usr/bin/env bash
# RDB backup of a Redis holding ~1 GB, to the same SeaweedFS, side by side:
#
#   gc-backup backup redis                                   (replication protocol, streamed)
#   redis-cli --rdb - | zstd -1 | aws s3 cp - s3://…          the streaming shell pipe
#   redis-cli --rdb f && aws s3 cp f s3://…                   the file-then-upload way
#
# Wall time, CPU of the contender's processes, peak RSS (largest process; gc-backup's own as it
# logs it), stored bytes, ratios. The data set: VALUES keys of ~1 KiB, half random (base64)
# and half repetitive text, so that compression has real work. One run (REPEAT=n for more,
# medians shown).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

REPEAT=${REPEAT:-1}
VALUES=${VALUES:-1000000}
ensure_rust
ensure_seaweedfs
apt_install redis-server redis-tools zstd time
command -v aws >/dev/null || python3 -m pip install -q awscli

work=$(mktemp -d /var/tmp/gcb-redisbench.XXXXXX)
REDIS_PID=
WEED_PID=
cleanup() {
  stop_pid "$REDIS_PID"
  stop_pid "$WEED_PID"
  rm -rf "$work"
}
trap cleanup EXIT

log "building gc-backup (release)"
cargo build --release --locked --quiet
GC_BACKUP="$ROOT/target/release/gc-backup"

start_seaweedfs "$work/s3" bench
port=$(free_port)
password=bench-redis-pw
redis-server --port "$port" --bind 127.0.0.1 --dir "$work" --requirepass "$password" \
  --save "" --appendonly no --logfile "$work/redis.log" &
REDIS_PID=$!
cli() { redis-cli -h 127.0.0.1 -p "$port" -a "$password" --no-auth-warning "$@"; }
until [ "$(cli PING 2>/dev/null)" = PONG ]; do sleep 0.1; done

log "loading $VALUES values of ~1 KiB"
python3 - "$VALUES" <<'PY' | cli --pipe >/dev/null
import base64, os, sys
n = int(sys.argv[1])
out = sys.stdout.buffer
text = b"GC Storage file metadata: owner=%d folder=/users/%d/documents tags=[a,b,c] " * 4
for i in range(n):
    key = b"file:%d" % i
    value = base64.b64encode(os.urandom(384)) + (text % (i % 97, i % 1000, i % 97, i % 1000, i % 97, i % 1000, i % 97, i % 1000))[:500]
    out.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
PY
log "dataset: $(cli INFO memory | grep used_memory_human | tr -d '\r')"

results="$work/results"
: >"$results"
s3_size() { echo "aws s3api head-object --bucket bench --key '$1' --query ContentLength --output text"; }
url="redis://:$password@127.0.0.1:$port"

for round in $(seq 1 "$REPEAT"); do
  bench_measure "$results" "gc-backup backup redis" \
    "GC_BACKUP_STORE=s3://bench/gcb '$GC_BACKUP' list --kind redis --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1][\"stored_bytes\"])'" \
    "GC_BACKUP_STORE=s3://bench/gcb GC_BACKUP_LOG_FORMAT=json '$GC_BACKUP' backup redis --redis-url '$url'"
  bench_measure "$results" "redis-cli --rdb - | zstd -1 | aws s3 cp -" "$(s3_size "pipe/dump-$round.rdb.zst")" \
    "redis-cli -h 127.0.0.1 -p $port -a $password --no-auth-warning --rdb - 2>/dev/null | zstd -1 -q | aws s3 cp - s3://bench/pipe/dump-$round.rdb.zst"
  bench_measure "$results" "redis-cli --rdb f && aws s3 cp f" "$(s3_size "file/dump-$round.rdb")" \
    "redis-cli -h 127.0.0.1 -p $port -a $password --no-auth-warning --rdb '$work/dump.rdb' >/dev/null && aws s3 cp --quiet '$work/dump.rdb' s3://bench/file/dump-$round.rdb && rm -f '$work/dump.rdb'"
done

bench_table "$results" "gc-backup backup redis"
