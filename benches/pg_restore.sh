#!/usr/bin/env bash
# Point-in-time restore of the ~2.5 GB bench cluster plus ~1 GB of WAL written after the base
# backup, from the same SeaweedFS over HTTPS, side by side:
#
#   gc-backup restore pg --start                     (wal-fetch with prefetch, the default)
#   gc-backup restore pg --start, prefetch off       (GC_BACKUP_WAL_PREFETCH=0)
#   pgbackrest restore (process-max=2), then the server started on it until recovery is done
#                                                    (restore_command = pgbackrest archive-get)
#
# Both tools archive the very same WAL (archive_command pushes to both), and both recoveries
# run on a server with the same settings: no TCP, a private socket directory. Reported: wall
# time to a recovered, stopped cluster; the base-restore part and the replay part; the replay
# throughput (WAL bytes / replay seconds); ratios against gc-backup. One run (REPEAT=n for
# more rounds, medians shown). Needs the cluster of benches/pg_dump_e2e.sh prepare.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

REPEAT=${REPEAT:-1}
WAL_GIB=${WAL_GIB:-1}
bench_setup restorebench
apt_install pgbackrest openssl time

WEED_PID=
cleanup() {
  for d in "$work"/restore-*; do
    [ -f "$d/postmaster.pid" ] && as_postgres "$PG_BIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
  done
  bench_cleanup
}
trap cleanup EXIT

bench_https_cluster
export GC_BACKUP_CONFIG="$work/gc-backup.toml"
write_pgbackrest_conf "$work" "$pgdata" "$BENCH_DIR/pg" repo1-bundle=y process-max=2 start-fast=y
as_postgres pgbackrest --config="$work/pgbackrest.conf" --stanza=bench stanza-create >/dev/null

# The same WAL reaches both archives.
psql -X -q -d postgres \
  -c "ALTER SYSTEM SET archive_command = 'GC_BACKUP_CONFIG=$work/gc-backup.toml $GC_BACKUP wal-push %p && pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p'" \
  -c "SELECT pg_reload_conf()" >/dev/null
# The segment's .done file is the archiver's own word (pg_stat_archiver can lag behind it).
wait_archived() {
  local last deadline=$((SECONDS + 600))
  last=$(psql -X -At -d postgres -c "SELECT pg_walfile_name(pg_switch_wal())")
  until [ -f "$pgdata/pg_wal/archive_status/$last.done" ] ||
    [ "$(psql -X -At -d postgres -c "SELECT last_archived_wal >= '$last' FROM pg_stat_archiver")" = t ]; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "WAL $last was not archived within 10 minutes" >&2; exit 1; }
    sleep 0.5
  done
}

log "base backups of both tools"
PGDATA="$pgdata" "$GC_BACKUP" backup pg-base >/dev/null
as_postgres pgbackrest --config="$work/pgbackrest.conf" --stanza=bench --type=full backup
wait_archived

log "writing ${WAL_GIB} GiB of WAL with pgbench"
start_lsn=$(psql -X -At -c "SELECT pg_current_wal_lsn()")
target=$((WAL_GIB * 1024 * 1024 * 1024))
while [ "$(psql -X -At -c "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$start_lsn')::bigint")" -lt "$target" ]; do
  "$PG_BIN/pgbench" -n -c 4 -j 2 -T 20 bench >/dev/null 2>&1
done
wal_bytes=$(psql -X -At -c "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$start_lsn')::bigint")
wait_archived
log "$((wal_bytes / 1048576)) MiB of WAL archived"

# Keep the page cache from favouring whichever runs second.
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
fresh_dir() {
  local dir="$work/restore-$1"
  rm -rf "$dir"
  install -d -o postgres -g postgres -m 700 "$dir"
  echo "$dir"
}
socket_opts() {
  local sock="$work/sock-$1"
  rm -rf "$sock"
  install -d -o postgres -g postgres -m 700 "$sock"
  echo "-c listen_addresses= -c unix_socket_directories=$sock -c port=5432 -c hot_standby=on"
}

results="$work/results"
: >"$results"
# record NAME WALL BASE REPLAY
record() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$results"; log "$1: $2 s (base $3 s, replay $4 s)"; }

run_gc_backup() {
  local name=$1 dir
  dir=$(fresh_dir "$2")
  drop_caches
  /usr/bin/time -f "%e" -o "$work/time" env GC_BACKUP_LOG=postgres=debug,gc_backup=info ${3:-} \
    "$GC_BACKUP" restore pg --pgdata "$dir" --start 2>"$work/err" || {
    echo "$name failed:" >&2; tail -5 "$work/err" >&2; exit 1; }
  local base replay
  base=$(grep -o 'MiB in [0-9.]*s\|GiB in [0-9.]*s' "$work/err" | grep -o '[0-9.]*s$' | tr -d s)
  replay=$(grep -o 'Recovered to .* in [0-9.]*s' "$work/err" | grep -o '[0-9.]*s$' | tr -d s)
  record "$name" "$(cat "$work/time")" "$base" "$replay"
  [ -n "${BENCH_LOGS:-}" ] && mkdir -p "$BENCH_LOGS" && cp "$work/err" "$BENCH_LOGS/$2-$round.log"
  rm -rf "$dir"
}

run_pgbackrest() {
  local dir start base_done ready
  dir=$(fresh_dir pgbackrest)
  drop_caches
  start=$(date +%s.%N)
  as_postgres pgbackrest --config="$work/pgbackrest.conf" --stanza=bench --pg1-path="$dir" \
    --process-max=2 --type=default restore
  base_done=$(date +%s.%N)
  local opts log="$work/sock-pgbackrest/recovery.log"
  opts=$(socket_opts pgbackrest)
  as_postgres "$PG_BIN/pg_ctl" -D "$dir" -o "$opts -c lc_messages=C -c log_line_prefix='%m [%p] '" \
    -l "$log" -w -t 3600 start >/dev/null
  # pg_ctl returns once hot standby accepts connections; recovery is done at promotion.
  until grep -q "database system is ready to accept connections" "$log"; do
    grep -q "FATAL\|PANIC" "$log" && { tail "$log" >&2; exit 1; }
    sleep 0.2
  done
  as_postgres "$PG_BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
  ready=$(date +%s.%N)
  [ -n "${BENCH_LOGS:-}" ] && mkdir -p "$BENCH_LOGS" && cp "$log" "$BENCH_LOGS/pgbackrest-$round.log"
  record "pgbackrest restore (process-max 2) + recovery" "$(echo "$ready - $start" | bc)" \
    "$(echo "$base_done - $start" | bc)" "$(echo "$ready - $base_done" | bc)"
  rm -rf "$dir"
}

# CONTENDERS narrows a run while tuning (e.g. CONTENDERS=gcb WAL_GIB=0); a reported run uses
# the first three. TUNING=1 adds the runs that take one recovery setting away each.
CONTENDERS=${CONTENDERS:-gcb gcb-noprefetch pgbackrest${TUNING:+ gcb-untuned gcb-fsync gcb-buffers gcb-restartpoints gcb-noreadahead gcb-hotstandby-off}}
for round in $(seq 1 "$REPEAT"); do
  for contender in $CONTENDERS; do
    case $contender in
      gcb) run_gc_backup "gc-backup restore pg --start" gcb ;;
      gcb-noprefetch) run_gc_backup "gc-backup restore pg --start, no prefetch" gcb-noprefetch GC_BACKUP_WAL_PREFETCH=0 ;;
      # The recovery settings of --start, each taken away in turn (see the README's table).
      gcb-untuned) run_gc_backup "gc-backup --start, the cluster's own settings" gcb-untuned GC_BACKUP_RECOVERY_SETTINGS=none ;;
      gcb-fsync) run_gc_backup "gc-backup --start, but fsync = on" gcb-fsync GC_BACKUP_RECOVERY_SETTINGS=fsync=on ;;
      gcb-buffers) run_gc_backup "gc-backup --start, but shared_buffers = 128MB" gcb-buffers GC_BACKUP_RECOVERY_SETTINGS=shared_buffers=128MB ;;
      gcb-restartpoints) run_gc_backup "gc-backup --start, but restartpoints (1GB, 5min)" gcb-restartpoints GC_BACKUP_RECOVERY_SETTINGS=max_wal_size=1GB,checkpoint_timeout=5min ;;
      gcb-hotstandby-off) run_gc_backup "gc-backup --start, but hot_standby = off" gcb-hotstandby-off GC_BACKUP_RECOVERY_SETTINGS=hot_standby=off ;;
      gcb-noreadahead) run_gc_backup "gc-backup --start, but recovery_prefetch = off" gcb-noreadahead GC_BACKUP_RECOVERY_SETTINGS=recovery_prefetch=off ;;
      pgbackrest) run_pgbackrest ;;
    esac
  done
done

python3 - "$results" "$pgdata_bytes" "$wal_bytes" <<'PY'
import sys
runs = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    runs.setdefault(f[0], []).append([f[0]] + [float(x) for x in f[1:]])
pgdata, wal = int(sys.argv[2]), int(sys.argv[3])
rows = {}
for name, group in runs.items():
    group.sort(key=lambda f: f[1])
    rows[name] = group[(len(group) - 1) // 2]
ours = rows.get("gc-backup restore pg --start", next(iter(rows.values())))[1]
print(f"PGDATA without pg_wal: {pgdata / 2**30:.2f} GiB; WAL replayed: {wal / 2**30:.2f} GiB")
print(f"{'run':48} {'total s':>8} {'base s':>7} {'base MiB/s':>10} {'replay s':>8} {'WAL MiB/s':>9} {'vs gc-backup':>12}")
for name, f in rows.items():
    _, total, base, replay = f
    print(f"{name:48} {total:8.1f} {base:7.1f} {pgdata / 2**20 / base:10.1f} {replay:8.1f} "
          f"{wal / 2**20 / max(replay, 0.001):9.1f} {total / ours:11.2f}x")
print("vs gc-backup: the run's total time divided by gc-backup's (2.00x = gc-backup takes half the time).")
PY
