#!/usr/bin/env bash
# Base backup of the ~2.5 GB bench cluster to the same SeaweedFS over HTTPS, side by side:
#
#   gc-backup backup pg-base                 (archive_command = gc-backup wal-push)
#   pgbackrest backup --type=full            (process-max=2, zst 1, repo-bundle=y;
#                                             archive_command = pgbackrest archive-push)
#   pg_basebackup -Ft -D - -X none | zstd -1 -T2 | aws s3 cp -
#
# Wall time, CPU seconds of the contender's processes and of the S3 server, peak RSS, stored
# bytes, throughput (PGDATA bytes / wall) and ratios. Medians of REPEAT (default 3) rounds.
# Needs the cluster of benches/pg_dump_e2e.sh prepare (BENCH_DIR).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

REPEAT=${REPEAT:-3}
bench_setup basebench
apt_install pgbackrest openssl time
command -v aws >/dev/null || python3 -m pip install -q awscli

WEED_PID=
trap bench_cleanup EXIT

bench_https_cluster
bench_pgbackrest

weed_cpu() { awk '{print $14 + $15}' "/proc/$WEED_PID/stat"; }

results="$work/results"
: >"$results"
measure() {
  local name=$1 stored_cmd=$2 cmd=$3 before after
  sync
  before=$(weed_cpu)
  /usr/bin/time -f "%e %U %S %M" -o "$work/time" bash -c "$cmd" >"$work/out" 2>"$work/err" || {
    echo "$name failed:" >&2; tail -5 "$work/err" >&2; exit 1; }
  after=$(weed_cpu)
  read -r wall user sys rss_kib <"$work/time"
  local agent_rss=-
  if grep -q peak_rss_bytes "$work/err"; then
    agent_rss=$(($(grep -o 'peak_rss_bytes[^0-9]*[0-9]*' "$work/err" | grep -o '[0-9]*$' | tail -n 1) / 1048576))
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$wall" "$(echo "$user + $sys" | bc)" \
    "$(echo "scale=2; ($after - $before) / $(getconf CLK_TCK)" | bc)" "$((rss_kib / 1024))" "$agent_rss" \
    "$(bash -c "$stored_cmd")" >>"$results"
  log "$name: ${wall}s"
}
prefix_bytes() { echo "aws s3 ls --recursive s3://bench/$1 | awk '{s+=\$3} END {print s+0}'"; }

# Whoever went first read PGDATA from disk and the others from the page cache (a first round
# measured 21.3 s against 15.0 s for the same backup): warm it for everyone.
log "warming the page cache with PGDATA"
tar -cf - -C "$pgdata" . 2>/dev/null | cat >/dev/null || true  # files change under a live server

for round in $(seq 1 "$REPEAT"); do
  set_archive_command "GC_BACKUP_CONFIG=$work/gc-backup.toml $work/gc-backup wal-push %p"
  measure "gc-backup backup pg-base (HTTPS)" \
    "GC_BACKUP_CONFIG='$work/gc-backup.toml' '$GC_BACKUP' list --kind pg-base --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1][\"stored_bytes\"])'" \
    "GC_BACKUP_CONFIG='$work/gc-backup.toml' GC_BACKUP_LOG_FORMAT=json PGDATA='$pgdata' '$GC_BACKUP' backup pg-base"

  set_archive_command "pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p"
  before_bytes=$(bash -c "$(prefix_bytes pgbackrest/backup)")
  measure "pgbackrest backup (process-max 2, zst 1, bundle)" \
    "echo \$((\$($(prefix_bytes pgbackrest/backup)) - $before_bytes))" \
    "runuser -u postgres -- pgbackrest --config='$work/pgbackrest.conf' --stanza=bench --type=full backup"

  measure "pg_basebackup -Ft -D - | zstd -1 -T2 | aws s3 cp -" \
    "aws s3api head-object --bucket bench --key pipe/base-$round.tar.zst --query ContentLength --output text" \
    "'$PG_BIN/pg_basebackup' -Ft -D - -X none -c fast | zstd -1 -T2 -q | aws s3 cp - s3://bench/pipe/base-$round.tar.zst"
done

python3 - "$results" "$pgdata_bytes" <<'PY'
import sys
runs = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    runs.setdefault(f[0], []).append(f)
pgdata = int(sys.argv[2])
rows = {}
for name, group in runs.items():
    group.sort(key=lambda f: float(f[1]))
    rows[name] = group[(len(group) - 1) // 2]
    print(f"{name}: wall times {', '.join(f[1] for f in group)}")
ours = next(v for k, v in rows.items() if k.startswith("gc-backup"))
print(f"\nPGDATA without pg_wal: {pgdata / 2**30:.2f} GiB")
print(f"{'run':52} {'wall s':>7} {'MiB/s':>7} {'cpu s':>6} {'S3 cpu s':>8} {'RSS MiB':>7} {'agent':>6} {'stored MiB':>10} {'speed vs it':>11}")
for name, f in rows.items():
    wall = float(f[1])
    print(f"{name:52} {wall:7.2f} {pgdata / 2**20 / wall:7.1f} {float(f[2]):6.2f} {float(f[3]):8.2f} "
          f"{int(f[4]):7d} {f[5]:>6} {int(f[6]) / 2**20:10.1f} {wall / float(ours[1]):10.2f}x")
print("speed vs it: the run's wall time divided by gc-backup's (above 1 = gc-backup is faster).")
PY
