#!/usr/bin/env bash
# Per-segment archive_command latency over 10 real WAL segments (taken from the bench cluster
# while pgbench writes), each contender pushing every segment to the same SeaweedFS:
#
#   gc-backup wal-push, cold (no sidecar)
#   gc-backup wal-push with the sidecar's look-ahead (what PostgreSQL waits for)
#   pgbackrest archive-push (sync, compress-type=zst level 1)
#   barman-cloud-wal-archive --gzip
#   zstd -1 < segment | aws s3 cp - s3://…
#
# All through SeaweedFS's HTTPS port (pgBackRest insists on TLS). Prints median and mean
# milliseconds per segment and the ratio to pgBackRest.
# Needs the cluster of benches/pg_dump_e2e.sh prepare (BENCH_DIR).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

bench_setup walbench
apt_install pgbackrest barman-cli-cloud openssl
command -v aws >/dev/null || python3 -m pip install -q awscli

WEED_PID=
cleanup() {
  stop_pid "$WEED_PID"
  stop_postgres "$BENCH_DIR/pg"
  rm -rf "$work"
}
trap cleanup EXIT

log "building gc-backup (release)"
cargo build --release --locked --quiet
GC_BACKUP="$ROOT/target/release/gc-backup"

PG_EXTRA_OPTS="-c shared_buffers=256MB -c max_wal_size=4GB" start_postgres "$BENCH_DIR/pg"
export PGDATABASE=bench
pgdata=$(psql -X -At -c "SHOW data_directory")

segments="$work/segments"
collect_wal_segments "$pgdata" "$segments" 10

log "starting SeaweedFS (HTTP and HTTPS)"
bench_tls "$work"
WEED_TLS_CERT="$work/server.pem" WEED_TLS_KEY="$work/key.pem" start_seaweedfs "$work/s3" bench
# Everyone through TLS, as pgBackRest must: gc-backup, barman-cloud and aws-cli alike.
export AWS_ENDPOINT_URL="https://localhost:$S3_HTTPS_PORT" AWS_CA_BUNDLE="$work/cert.pem"
export GC_BACKUP_CA_FILE="$work/cert.pem"

# A fake PGDATA for the look-ahead run: the segments .ready in pg_wal/archive_status.
fake="$work/pgdata"
mkdir -p "$fake/pg_wal/archive_status"
for s in "$segments"/*; do
  cp "$s" "$fake/pg_wal/"
  touch "$fake/pg_wal/archive_status/$(basename "$s").ready"
done

write_pgbackrest_conf "$work" "$pgdata" "$BENCH_DIR/pg"
chmod 755 "$segments" && chmod 644 "$segments"/*
as_postgres pgbackrest --config="$work/pgbackrest.conf" --stanza=bench stanza-create >/dev/null

results="$work/results"
: >"$results"
# time_each NAME CMD-TEMPLATE: runs CMD with {} replaced by each segment path, in order.
time_each() {
  local name=$1 template=$2 s cmd start end
  for s in "$segments"/*; do
    cmd=${template//\{\}/$s}
    cmd=${cmd//\{name\}/$(basename "$s")}
    start=$(date +%s%N)
    bash -c "$cmd" >/dev/null 2>"$work/err" || { echo "$name failed on $s:" >&2; cat "$work/err" >&2; exit 1; }
    end=$(date +%s%N)
    printf '%s\t%s\n' "$name" $(((end - start) / 1000)) >>"$results"
  done
  log "$name done"
}

export GC_BACKUP_LOG_FORMAT=json
time_each "gc-backup wal-push (cold)" \
  "GC_BACKUP_STORE=s3://bench/gcb-cold '$GC_BACKUP' wal-push {}"

# Look-ahead: the sidecar stores the .ready segments first; PostgreSQL's wal-push follows.
GC_BACKUP_STORE=s3://bench/gcb-ahead PGDATA="$fake" "$GC_BACKUP" run 2>"$work/sidecar.log" &
sidecar=$!
for _ in $(seq 1 300); do
  [ "$(ls "$fake/pg_wal/archive_status" | grep -c gc-stored)" -ge 10 ] && break
  sleep 0.1
done
(cd "$fake" && time_each "gc-backup wal-push (sidecar look-ahead)" \
  "GC_BACKUP_STORE=s3://bench/gcb-ahead '$GC_BACKUP' wal-push pg_wal/{name}")
kill -TERM "$sidecar"
wait "$sidecar" || true

time_each "pgbackrest archive-push (zst 1, sync)" \
  "runuser -u postgres -- pgbackrest --config='$work/pgbackrest.conf' --stanza=bench archive-push {}"
time_each "barman-cloud-wal-archive --gzip" \
  "barman-cloud-wal-archive --endpoint-url '$AWS_ENDPOINT_URL' --gzip s3://bench/barman bench {}"
time_each "zstd -1 | aws s3 cp -" \
  "zstd -1 -q -c {} | aws s3 cp - s3://bench/pipe/{name}.zst"

python3 - "$results" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, micros = line.rstrip("\n").split("\t")
    runs.setdefault(name, []).append(int(micros) / 1000)
peer = statistics.median(runs["pgbackrest archive-push (zst 1, sync)"])
print()
print(f"{'archive_command (10 real 16 MiB segments)':45} {'median ms':>10} {'mean ms':>9} {'÷ pgBackRest':>13}")
for name, ms in runs.items():
    print(f"{name:45} {statistics.median(ms):10.1f} {statistics.mean(ms):9.1f} {statistics.median(ms) / peer:12.2f}x")
PY
