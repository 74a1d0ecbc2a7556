#!/usr/bin/env bash
# Sustained archiving: pgbench -c 4 for DURATION seconds (default 60) on the bench cluster,
# archive_command = gc-backup wal-push into SeaweedFS, once with the sidecar's look-ahead
# (gc-backup run) and once without. Samples the .ready count every second and reports the
# WAL rate, pending segments (max, mean), archive failures, and how long the backlog takes to
# drain once pgbench stops. Needs the cluster of benches/pg_dump_e2e.sh prepare (BENCH_DIR).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

bench_sidecar_setup walsustained
pgdata=$(psql -X -At -c "SHOW data_directory")

run() {
  local mode=$1 prefix=$2
  bench_store_config "$prefix"
  set_archive_command "GC_BACKUP_CONFIG=$work/$prefix.toml $work/gc-backup wal-push %p"
  # Start from a drained archive.
  psql -X -q -c "SELECT pg_switch_wal()" >/dev/null
  sleep 3
  if [ "$mode" = look-ahead ]; then
    GC_BACKUP_CONFIG="$work/$prefix.toml" PGDATA="$pgdata" "$work/gc-backup" run 2>"$work/sidecar.log" &
    sidecar=$!
  fi
  local start_lsn failed_before archived_before
  start_lsn=$(psql -X -At -c "SELECT pg_current_wal_lsn()")
  read -r failed_before archived_before < <(psql -X -At -F ' ' -c "SELECT failed_count, archived_count FROM pg_stat_archiver")
  "$PG_BIN/pgbench" -n -c 4 -j 2 -T "$DURATION" bench >"$work/pgbench.out" 2>&1 &
  local load=$! samples=()
  while kill -0 "$load" 2>/dev/null; do
    samples+=("$(ls "$pgdata/pg_wal/archive_status" | grep -c '\.ready$' || true)")
    sleep 1
  done
  wait "$load" || true
  local wal_bytes tps drain_start drained
  wal_bytes=$(psql -X -At -c "SELECT pg_current_wal_lsn() - '$start_lsn'::pg_lsn")
  tps=$(grep -o 'tps = [0-9.]*' "$work/pgbench.out" | head -n 1 | cut -d' ' -f3)
  psql -X -q -c "SELECT pg_switch_wal()" >/dev/null
  drain_start=$(date +%s%N)
  for _ in $(seq 1 600); do
    [ "$(ls "$pgdata/pg_wal/archive_status" | grep -c '\.ready$' || true)" = 0 ] && break
    sleep 0.1
  done
  drained=$((($(date +%s%N) - drain_start) / 1000000))
  local failed_after archived_after
  read -r failed_after archived_after < <(psql -X -At -F ' ' -c "SELECT failed_count, archived_count FROM pg_stat_archiver")
  bench_stop_sidecar
  python3 - "$mode" "$wal_bytes" "$DURATION" "$tps" "$drained" "$((archived_after - archived_before))" \
    "$((failed_after - failed_before))" "${samples[@]}" >>"$work/results" <<'PY'
import sys
mode, wal, duration, tps, drained, archived, failed, *samples = sys.argv[1:]
samples = [int(s) for s in samples] or [0]
print(f"{mode:12} {int(wal) / 2**20 / int(duration):8.1f} {float(tps or 0):8.0f} {archived:>9} {failed:>7} "
      f"{max(samples):>8} {sum(samples) / len(samples):9.2f} {int(drained):>9}")
PY
  log "$mode done"
}

run look-ahead sustained-ahead
run without-sidecar sustained-plain
echo
printf '%-12s %8s %8s %9s %7s %8s %9s %9s\n' "archiving" "WAL MB/s" "tps" "archived" "failed" "max .ready" "mean" "drain ms"
cat "$work/results"
