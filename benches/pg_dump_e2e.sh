#!/usr/bin/env bash
# End-to-end comparison of `gc-backup backup pg-dump` with what SREs would otherwise run, on
# the same database and the same S3 server (SeaweedFS on loopback), in one run:
#
#   pg_dump -Fc -Z0 > /dev/null                           the source's own limit
#   pg_dump | gzip > file && aws s3 cp file s3://…         the runbook's CronJob way
#   pg_dump -Fc -Z0 | zstd -1 | aws s3 cp - s3://…          the streaming shell pipe
#
# For each: wall time, CPU (user+sys of every process), peak RSS (largest process), stored
# bytes, and ratios against gc-backup. The data set is ../shared/bench/load-bench-db.sh's
# (2.5 GB, the one the issues' peer figures were measured on), plus a smaller one of the same
# shape to show that the agent's memory does not grow with the database.
#
# Usage: benches/pg_dump_e2e.sh [prepare|run]   (default: both)
# BENCH_DIR keeps the loaded cluster between runs (default /var/tmp/gc-backup-bench).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

BENCH_DIR=${BENCH_DIR:-/var/tmp/gc-backup-bench}
LOADER=${LOADER:-$ROOT/../shared/bench/load-bench-db.sh}
SMALL_SCALE=${SMALL_SCALE:-20}
SMALL_FILES_ROWS=${SMALL_FILES_ROWS:-300000}
step=${1:-all}

ensure_rust
ensure_postgres
ensure_seaweedfs
apt_install gzip time
command -v aws >/dev/null || python3 -m pip install -q awscli

PG_EXTRA_OPTS="-c shared_buffers=256MB -c max_wal_size=4GB -c checkpoint_timeout=30min"
export PG_EXTRA_OPTS
mkdir -p "$BENCH_DIR"
start_postgres "$BENCH_DIR/pg"
weed_pid=
s3_dir=
cleanup() {
  [ -n "$weed_pid" ] && kill "$weed_pid" 2>/dev/null && wait "$weed_pid" 2>/dev/null
  [ -n "${s3_dir:-}" ] && rm -rf "$s3_dir"
  stop_postgres "$BENCH_DIR/pg"
}
trap cleanup EXIT

has_db() { [ "$(psql -X -At -d postgres -c "SELECT count(*) FROM pg_database WHERE datname = '$1'")" = 1 ]; }

if [ "$step" = prepare ] || [ "$step" = all ]; then
  if ! has_db bench_small; then
    log "loading the small data set (scale $SMALL_SCALE, $SMALL_FILES_ROWS files rows)"
    has_db bench && psql -X -q -d postgres -c "DROP DATABASE bench"
    SCALE=$SMALL_SCALE FILES_ROWS=$SMALL_FILES_ROWS bash "$LOADER"
    psql -X -q -d postgres -c "ALTER DATABASE bench RENAME TO bench_small"
  fi
  if ! has_db bench; then
    log "loading the 2.5 GB data set with $LOADER"
    bash "$LOADER"
  fi
fi
[ "$step" = prepare ] && exit 0

log "building gc-backup (release)"
cargo build --release --locked --quiet
GC_BACKUP="$ROOT/target/release/gc-backup"
PG_DUMP="$PG_BIN/pg_dump"

s3_dir="$BENCH_DIR/s3-$$"
start_seaweedfs "$s3_dir" bench
weed_pid=$WEED_PID

results="$s3_dir/results"
: >"$results"
# measure NAME STORED_CMD CMD: runs CMD under GNU time; STORED_CMD prints the stored bytes.
# Each contender runs REPEAT times (rounds interleave the contenders); the table shows the
# run with the median wall time.
measure() {
  local name=$1 stored_cmd=$2 cmd=$3
  sync
  /usr/bin/time -f "%e %U %S %M" -o "$s3_dir/time" bash -c "$cmd" >"$s3_dir/out" 2>"$s3_dir/err" || {
    echo "$name failed:" >&2; cat "$s3_dir/err" >&2; exit 1; }
  read -r wall user sys rss_kib <"$s3_dir/time"
  local stored
  stored=$(bash -c "$stored_cmd")
  local agent_rss=-
  if grep -q peak_rss_bytes "$s3_dir/err"; then
    agent_rss=$(grep -o 'peak_rss_bytes[^0-9]*[0-9]*' "$s3_dir/err" | grep -o '[0-9]*$' | tail -n 1)
    agent_rss=$((agent_rss / 1048576))
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$wall" "$(echo "$user + $sys" | bc)" \
    "$((rss_kib / 1024))" "$agent_rss" "$stored" >>"$results"
  log "$name: ${wall}s wall"
}

s3_size() { echo "aws s3api head-object --bucket bench --key '$1' --query ContentLength --output text"; }
agent_stored() { echo "GC_BACKUP_STORE=s3://bench/agent-$1 '$GC_BACKUP' list --kind pg-dump --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1][\"stored_bytes\"])'"; }

# DBS and ONLY_AGENT narrow a run while tuning; a reported run uses neither.
REPEAT=${REPEAT:-3}
for round in $(seq 1 "$REPEAT"); do
for db in ${DBS:-bench_small bench}; do
  export PGDATABASE=$db
  size=$(psql -X -At -d postgres -c "SELECT pg_size_pretty(pg_database_size('$db'))")
  log "database $db ($size)"
  # Warm the page cache so that every contender reads from memory alike.
  "$PG_DUMP" -Fc -Z0 >/dev/null
  measure "$db pg_dump -Fc -Z0 > /dev/null" "echo 0" "'$PG_DUMP' -Fc -Z0 > /dev/null"
  measure "$db gc-backup backup pg-dump" "$(agent_stored "$db")" \
    "GC_BACKUP_STORE=s3://bench/agent-$db GC_BACKUP_LOG_FORMAT=json '$GC_BACKUP' backup pg-dump"
  [ -n "${ONLY_AGENT:-}" ] && continue
  measure "$db pg_dump -Fc -Z0 | zstd -1 | aws s3 cp -" "$(s3_size "pipe/$db.dump.zst")" \
    "'$PG_DUMP' -Fc -Z0 | zstd -1 -q | aws s3 cp - s3://bench/pipe/$db.dump.zst"
  if [ "$db" = bench ] || [ -n "${ALL_PEERS:-}" ]; then
    measure "$db pg_dump | gzip > f && aws s3 cp f (CronJob)" "$(s3_size "cronjob/$db.sql.gz")" \
      "'$PG_DUMP' | gzip > '$s3_dir/$db.sql.gz' && aws s3 cp --quiet '$s3_dir/$db.sql.gz' s3://bench/cronjob/$db.sql.gz && rm -f '$s3_dir/$db.sql.gz'"
  fi
done
done

python3 - "$results" <<'PY'
import sys
import statistics
runs = {}
for line in open(sys.argv[1]):
    fields = line.rstrip("\n").split("\t")
    runs.setdefault(fields[0], []).append(fields)
rows = []
for name, group in runs.items():
    group.sort(key=lambda f: float(f[1]))
    median = group[(len(group) - 1) // 2]
    walls = ", ".join(f[1] for f in group)
    print(f"{name}: wall times {walls}")
    rows.append(median)
print()
print(f"{'run':58} {'wall s':>7} {'cpu s':>7} {'RSS MiB':>8} {'agent MiB':>9} {'stored MiB':>10} {'gc-backup ÷ it':>15}")
by_db = {}
for name, wall, cpu, rss, agent, stored in rows:
    by_db.setdefault(name.split()[0], []).append((name, float(wall), float(cpu), int(rss), agent, int(stored)))
for db, runs in by_db.items():
    ours = next(r for r in runs if "gc-backup" in r[0])
    for name, wall, cpu, rss, agent, stored in runs:
        stored_text = f"{stored / 2**20:10.1f}" if stored else f"{'-':>10}"
        ratio = f"{ours[1] / wall:14.2f}x"
        print(f"{name:58} {wall:7.2f} {cpu:7.2f} {rss:8d} {agent:>9} {stored_text} {ratio}")
    print()
print("wall-time ratio: gc-backup's wall time divided by the run's (below 1 = gc-backup is faster).")
PY
