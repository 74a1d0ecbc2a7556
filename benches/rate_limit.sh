#!/usr/bin/env bash
# A base backup of the ~2.5 GB bench cluster held to an upload rate, side by side with the shell
# pipe an SRE would throttle with pv, to the same SeaweedFS over HTTPS:
#
#   gc-backup backup pg-base            with GC_BACKUP_MAX_UPLOAD_RATE=R
#   pg_basebackup -Ft -D - -X none | zstd -1 -T2 | pv -L R | aws s3 cp -
#
# for R in RATES (MiB/s, default "20 50 100"), and once without a limit for each, to show what
# the machine can do at all. The limit counts what goes over the wire (stored, compressed
# bytes), so the expected time is stored bytes ÷ R; "vs expected" is wall ÷ that (1.00 = the
# rate held exactly, 1.05 = 5 % slower). A rate above the unlimited run's own stored rate cannot
# bind: the row says so instead of a ratio. Medians of REPEAT (default 1) rounds.
# Needs the cluster of benches/pg_dump_e2e.sh prepare (BENCH_DIR).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

REPEAT=${REPEAT:-1}
RATES=${RATES:-20 50 100}
bench_setup ratebench
apt_install openssl time pv
command -v aws >/dev/null || python3 -m pip install -q awscli

WEED_PID=
trap bench_cleanup EXIT
bench_https_cluster
set_archive_command "GC_BACKUP_CONFIG=$work/gc-backup.toml $work/gc-backup wal-push %p"

results="$work/results"
: >"$results"
stored_ours="GC_BACKUP_CONFIG='$work/gc-backup.toml' '$GC_BACKUP' list --kind pg-base --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1][\"stored_bytes\"])'"

log "warming the page cache with PGDATA"
tar -cf - -C "$pgdata" . 2>/dev/null | cat >/dev/null || true  # files change under a live server

n=0
for round in $(seq 1 "$REPEAT"); do
  for rate in unlimited $RATES; do
    n=$((n + 1))
    if [ "$rate" = unlimited ]; then limit_env= pv_cmd=cat; else limit_env="GC_BACKUP_MAX_UPLOAD_RATE=${rate}MiB/s" pv_cmd="pv -q -L ${rate}m"; fi
    bench_measure "$results" "gc-backup $rate" "$stored_ours" \
      "$limit_env GC_BACKUP_CONFIG='$work/gc-backup.toml' GC_BACKUP_LOG_FORMAT=json PGDATA='$pgdata' '$GC_BACKUP' backup pg-base"
    bench_measure "$results" "pipe $rate" \
      "aws s3api head-object --bucket bench --key pipe/base-$n.tar.zst --query ContentLength --output text" \
      "'$PG_BIN/pg_basebackup' -Ft -D - -X none -c fast | zstd -1 -T2 -q | $pv_cmd | aws s3 cp - s3://bench/pipe/base-$n.tar.zst"
  done
done

python3 - "$results" <<'PY'
import sys
runs = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    runs.setdefault(f[0], []).append(f)
rows = {}
for name, group in runs.items():
    group.sort(key=lambda f: float(f[1]))
    rows[name] = group[(len(group) - 1) // 2]
MiB = 2**20
print(f"{'run':22} {'limit MiB/s':>11} {'wall s':>7} {'stored MiB':>10} {'MiB/s':>7} "
      f"{'expected s':>10} {'vs expected':>11} {'RSS MiB':>7}")
for name, f in rows.items():
    who, rate = name.split(" ", 1)
    wall, stored = float(f[1]), int(f[5])
    free = rows[f"{who} unlimited"]
    free_rate = int(free[5]) / MiB / float(free[1])
    if rate == "unlimited":
        expected, verdict = "-", "-"
    else:
        expected = stored / MiB / float(rate)
        verdict = (f"{wall / expected:.3f}" if float(rate) < free_rate
                   else f"above {free_rate:.0f}")
        expected = f"{expected:.2f}"
    print(f"{name:22} {rate:>11} {wall:7.2f} {stored / MiB:10.1f} {stored / MiB / wall:7.1f} "
          f"{expected:>10} {verdict:>11} {int(f[3]):7d}")
print("vs expected: wall ÷ (stored ÷ limit); 'above N' = the limit is above the N MiB/s this\n"
      "machine stores at without one, so it cannot bind.")
PY
