#!/usr/bin/env bash
# The cost of age encryption, in one run on the ~2.5 GB bench cluster, SeaweedFS over HTTPS:
#
#   gc-backup backup pg-base, clear and encrypted (rounds alternate)   target: within 10%
#   gc-backup wal-push of 10 real segments, clear and encrypted        target: within 5 ms
#     each segment pushed both ways in turn, ROUNDS (default 3) times into fresh prefixes;
#     the figure is the median of the paired differences, which cancels the machine's drift
#
# Medians of REPEAT (default 3) base backup rounds. Needs the cluster of
# benches/pg_dump_e2e.sh prepare (BENCH_DIR).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

REPEAT=${REPEAT:-3}
bench_setup encbench
apt_install openssl time age

WEED_PID=
trap bench_cleanup EXIT

bench_https_cluster
age-keygen -o "$work/identity.txt" 2>/dev/null
recipient=$(age-keygen -y "$work/identity.txt")
# Two stores: the clear one, and one whose config adds the recipient (all a writer needs).
sed 's|s3://bench/gcb|s3://bench/clear|' "$work/gc-backup.toml" >"$work/clear.toml"
sed 's|s3://bench/gcb|s3://bench/sealed|' "$work/gc-backup.toml" >"$work/sealed.toml"
printf '\n[encryption]\nrecipients = ["%s"]\n' "$recipient" >>"$work/sealed.toml"
chmod 644 "$work/clear.toml" "$work/sealed.toml"

results="$work/results"
: >"$results"
log "warming the page cache with PGDATA"
tar -cf - -C "$pgdata" . 2>/dev/null | cat >/dev/null || true

# WAL goes to both stores all along, so that each base backup finds its WAL in its own store
# whichever mode was running when a segment filled (switching between rounds raced).
set_archive_command "GC_BACKUP_CONFIG=$work/clear.toml $work/gc-backup wal-push %p && GC_BACKUP_CONFIG=$work/sealed.toml $work/gc-backup wal-push %p"
base() {
  local mode=$1
  bench_measure "$results" "pg-base $mode" \
    "GC_BACKUP_CONFIG='$work/$mode.toml' '$GC_BACKUP' list --kind pg-base --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1][\"stored_bytes\"])'" \
    "GC_BACKUP_CONFIG='$work/$mode.toml' GC_BACKUP_LOG_FORMAT=json PGDATA='$pgdata' '$GC_BACKUP' backup pg-base"
}
for round in $(seq 1 "$REPEAT"); do
  if [ $((round % 2)) = 1 ]; then base clear; base sealed; else base sealed; base clear; fi
done

segments="$work/segments"
collect_wal_segments "$pgdata" "$segments" 10
# pgbench's checkpoint and autovacuum would otherwise run under the first pushes.
psql -X -q -c CHECKPOINT
sleep 5
wal="$work/wal-results"
: >"$wal"
push() {
  local mode=$1 segment=$2 round=$3 start end user sys
  start=$(date +%s%N)
  GC_BACKUP_CONFIG="$work/$mode.toml" GC_BACKUP_STORE="s3://bench/wal-$mode-$round" \
    /usr/bin/time -f "%U %S" -o "$work/cpu" "$GC_BACKUP" wal-push "$segment" \
    2>"$work/err" || { echo "wal-push ($mode) failed:" >&2; cat "$work/err" >&2; exit 1; }
  end=$(date +%s%N)
  read -r user sys <"$work/cpu"
  printf '%s\t%s\t%s\t%s\n' "$mode" $(((end - start) / 1000)) "$round $(basename "$segment")" \
    "$(echo "$user + $sys" | bc)" >>"$wal"
}
for round in $(seq 1 "${ROUNDS:-3}"); do
  for s in "$segments"/*; do push clear "$s" "$round"; push sealed "$s" "$round"; done
done

# The encrypted store opens with the identity alone: one restore-side check of the result.
GC_BACKUP_CONFIG="$work/sealed.toml" GC_BACKUP_AGE_IDENTITY_FILE="$work/identity.txt" \
  "$GC_BACKUP" verify --kind pg-base >"$work/verify.out" 2>"$work/verify.err" || {
  echo "verify of the encrypted backups failed:" >&2; cat "$work/verify.out" >&2
  tail -3 "$work/verify.err" >&2; exit 1; }

python3 - "$results" "$wal" "$pgdata_bytes" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    runs.setdefault(f[0], []).append(f)
pgdata = int(sys.argv[3])
med = {}
for name, group in runs.items():
    walls = sorted(float(f[1]) for f in group)
    med[name] = (statistics.median(walls), group)
    print(f"{name}: wall times {', '.join(f'{w:.2f}' for w in walls)}")
clear, sealed = med["pg-base clear"][0], med["pg-base sealed"][0]
print(f"\nPGDATA without pg_wal: {pgdata / 2**30:.2f} GiB")
print(f"{'base backup':20} {'wall s':>7} {'MiB/s':>7} {'cpu s':>7} {'agent RSS':>9}")
for name, (wall, group) in med.items():
    row = min(group, key=lambda f: abs(float(f[1]) - wall))
    print(f"{name:20} {wall:7.2f} {pgdata / 2**20 / wall:7.1f} {float(row[2]):7.2f} {row[4]:>9}")
loss = (sealed / clear - 1) * 100
print(f"encrypted throughput: {clear / sealed * 100:.1f}% of clear ({loss:+.1f}% time; target: at least 90%)")
pushes, by_push, cpu = {}, {}, {}
for line in open(sys.argv[2]):
    mode, micros, push, seconds = line.rstrip("\n").split("\t")
    pushes.setdefault(mode, []).append(int(micros) / 1000)
    by_push.setdefault(push, {})[mode] = int(micros) / 1000
    cpu.setdefault(mode, []).append(float(seconds) * 1000)
paired = [p["sealed"] - p["clear"] for p in by_push.values()]
print(f"\n{f'wal-push ({len(paired)} pushes each)':24} {'median ms':>10} {'mean ms':>9} {'CPU ms':>7}")
for mode, ms in pushes.items():
    print(f"{mode:24} {statistics.median(ms):10.1f} {statistics.mean(ms):9.1f} {statistics.mean(cpu[mode]):7.1f}")
print(f"encrypted - clear, paired: median {statistics.median(paired):+.1f} ms, "
      f"mean {statistics.mean(paired):+.1f} ms per segment (target: within 5 ms)")
PY
