#!/usr/bin/env bash
# Recovery point lag: WAL streaming (`[postgres] stream-wal`) against archive_command alone,
# side by side on the bench cluster with archive_timeout = 0, under pgbench -c 4 for DURATION
# seconds (default 60) at full speed and then rate-limited to LIGHT_TPS (default 100), the
# load of a quiet hour. A marker transaction commits 10 times a second (its time, and after
# its commit the WAL position, in two tables). Every second the newest marker whose WAL is
# in the store is looked up (streaming: the position the receiver confirmed to PostgreSQL,
# which it confirms only once stored; archive_command: the end of the last archived
# segment), and its age against the primary's clock is the lag. Reports median and worst lag,
# pgbench's TPS (the cost of streaming) and the sidecar's peak RSS. Targets (issue 16, full
# speed): median <= 2 s, worst <= 5 s, TPS cost <= 5%.
# REPEAT=N (default 3) runs the full-speed pair N times, alternating, because pgbench's own
# spread between runs on a small machine is larger than the cost being measured: the TPS
# cost is that of the median TPS of each mode, and each pair's is shown too. BENCH_LOGS=DIR
# keeps each run's samples (time, lag) and the sidecar's debug log (every upload's time).
# Needs the cluster of benches/pg_dump_e2e.sh prepare (BENCH_DIR).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

bench_sidecar_setup walstream "-c archive_timeout=0"
metrics_port=$(free_port)

cat >"$work/marks.sql" <<'SQL'
INSERT INTO rpo_marks (at) VALUES (clock_timestamp()) RETURNING id \gset
INSERT INTO rpo_commits VALUES (:id, pg_current_wal_insert_lsn());
SQL

# The stored position, as an LSN, in each mode.
streamed_lsn() {
  # What the receiver confirmed: it confirms only what is stored (the metrics are copied
  # every 5 s, too coarse to sample a lag of seconds).
  psql -X -At -c "SELECT flush_lsn FROM pg_stat_replication
    WHERE application_name = 'gc-backup' AND flush_lsn IS NOT NULL"
}
archived_lsn() {
  psql -X -At -c "SELECT CASE WHEN last_archived_wal ~ '^[0-9A-F]{24}$' THEN
      (('x' || substr(last_archived_wal, 9, 8))::bit(32)::bigint * 4294967296
       + (('x' || substr(last_archived_wal, 17, 8))::bit(32)::bigint + 1) * 16777216) END
    FROM pg_stat_archiver" | { read -r bytes; [ -n "$bytes" ] && printf '%X/%X' $((bytes >> 32)) $((bytes & 0xFFFFFFFF)); }
}

run() {
  local mode=$1 prefix=$2 load_args=$3
  bench_store_config "$prefix"
  set_archive_command "GC_BACKUP_CONFIG=$work/$prefix.toml $work/gc-backup wal-push %p"
  psql -X -q -c "DROP TABLE IF EXISTS rpo_marks, rpo_commits" \
    -c "CREATE TABLE rpo_marks (id bigserial PRIMARY KEY, at timestamptz)" \
    -c "CREATE TABLE rpo_commits (id bigint PRIMARY KEY, lsn pg_lsn)" \
    -c "SELECT pg_switch_wal()" >/dev/null
  local position=archived_lsn streamed=
  if [[ $mode == streaming* ]]; then
    streamed=1
    # A slot left by the last streaming run would hold the WAL of the runs since, and the
    # receiver would spend this run's first seconds catching up: that is the lag after an
    # outage, not the steady state measured here.
    psql -X -q -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
      WHERE slot_name = 'gc_backup' AND NOT active" >/dev/null
    # Streaming only: no PGDATA, so no look-ahead archiving beside it.
    GC_BACKUP_CONFIG="$work/$prefix.toml" GC_BACKUP_STREAM_WAL=true \
      GC_BACKUP_METRICS_LISTEN="127.0.0.1:$metrics_port" GC_BACKUP_LOG_FORMAT=json \
      GC_BACKUP_LOG="${GC_BACKUP_LOG:-info,gc_backup::wal::receiver=debug}" \
      "$work/gc-backup" run 2>"$work/sidecar.log" &
    # shellcheck disable=SC2034  # read by bench_stop_sidecar
    sidecar=$!
    position=streamed_lsn
    local now
    now=$(psql -X -At -c "SELECT pg_current_wal_lsn()")
    for _ in $(seq 1 300); do
      local confirmed
      confirmed=$(streamed_lsn)
      [ -n "$confirmed" ] &&
        [ "$(psql -X -At -c "SELECT '$confirmed'::pg_lsn >= '$now'::pg_lsn")" = t ] && break
      sleep 0.1
    done
  fi
  # shellcheck disable=SC2086
  "$PG_BIN/pgbench" -n -c 4 -j 2 -T "$DURATION" $load_args bench >"$work/pgbench.out" 2>&1 &
  local load=$!
  "$PG_BIN/pgbench" -n -c 1 -R 10 -T "$DURATION" -f "$work/marks.sql" bench >"$work/marks.out" 2>&1 &
  local marks=$! samples=()
  : >"$work/samples"
  sleep 2
  while kill -0 "$load" 2>/dev/null; do
    local lsn lag
    lsn=$($position || true)
    if [ -n "$lsn" ]; then
      # No marker stored yet: the lag is the whole run so far.
      lag=$(psql -X -At -c "SELECT extract(epoch FROM clock_timestamp() - coalesce(max(m.at),
          (SELECT min(at) FROM rpo_marks)))
        FROM rpo_marks m JOIN rpo_commits c USING (id) WHERE c.lsn <= '$lsn'::pg_lsn")
      [ -n "$lag" ] && samples+=("$lag") && echo "$(date +%T.%N | cut -c1-12) $lag" >>"$work/samples"
    fi
    sleep 1
  done
  wait "$load" || true
  wait "$marks" || true
  local tps rss=-
  tps=$(grep -o 'tps = [0-9.]*' "$work/pgbench.out" | head -n 1 | cut -d' ' -f3)
  if [ -n "$sidecar" ] && grep -q '"level":"ERROR"' "$work/sidecar.log"; then
    echo "$mode: the sidecar logged errors, the last:" >&2
    grep '"level":"ERROR"' "$work/sidecar.log" | tail -n 3 >&2
  fi
  if [ -n "$streamed" ]; then
    rss=$(curl -s "http://127.0.0.1:$metrics_port/metrics" |
      awk '$1 == "gc_backup_peak_rss_bytes" { printf "%.0f", $2 / 1048576 }')
    bench_stop_sidecar
  fi
  if [ -n "${BENCH_LOGS:-}" ]; then
    mkdir -p "$BENCH_LOGS"
    local name=${mode//[ ,]/_}
    cp "$work/samples" "$BENCH_LOGS/$name-samples.txt"
    if [ -n "$streamed" ]; then cp "$work/sidecar.log" "$BENCH_LOGS/$name-sidecar.log"; fi
  fi
  python3 - "$mode" "$tps" "$rss" "${samples[@]}" >>"$work/results" <<'PY'
import statistics, sys
mode, tps, rss, *samples = sys.argv[1:]
lags = sorted(float(s) for s in samples)
if not lags:
    print(f"{mode:36} {'no samples':>10}")
else:
    print(f"{mode:36} {statistics.median(lags):10.2f} {lags[-1]:9.2f} {len(lags):8d} {float(tps or 0):8.0f} {rss:>8}")
PY
  log "$mode done"
}

LIGHT_TPS=${LIGHT_TPS:-100}
REPEAT=${REPEAT:-3}
for round in $(seq 1 "$REPEAT"); do
  run "archive_command alone #$round" "rpo-archive-$round" ""
  run "streaming #$round" "rpo-stream-$round" ""
done
run "archive_command alone, $LIGHT_TPS tps" rpo-archive-light "-R $LIGHT_TPS"
run "streaming, $LIGHT_TPS tps" rpo-stream-light "-R $LIGHT_TPS"
echo
printf '%-36s %10s %9s %8s %8s %8s\n' "run" "median s" "worst s" "samples" "tps" "RSS MiB"
cat "$work/results"
python3 - "$work/results" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if len(line.split()) >= 6]
def of(mode):
    return [r for r in rows if " ".join(r[:-5]).startswith(mode + " #")]
base, streamed = of("archive_command alone"), of("streaming")
if base and streamed:
    for b, s in zip(base, streamed):
        print(f"pair {b[-6]}: TPS cost {100 * (float(b[-2]) - float(s[-2])) / float(b[-2]):.1f}%")
    tb = statistics.median(float(r[-2]) for r in base)
    ts = statistics.median(float(r[-2]) for r in streamed)
    print(f"median TPS: archive_command alone {tb:.0f}, streaming {ts:.0f}: "
          f"TPS cost of streaming {100 * (tb - ts) / tb:.1f}% (target <= 5%)")
    medians = [float(r[-5]) for r in streamed]
    worst = max(float(r[-4]) for r in streamed)
    print(f"streaming at full speed: median lag {statistics.median(medians):.2f} s "
          f"(target <= 2), worst {worst:.2f} s of {sum(int(r[-3]) for r in streamed)} "
          f"samples (target <= 5)")
PY
psql -X -q -c "DROP TABLE IF EXISTS rpo_marks, rpo_commits" >/dev/null
