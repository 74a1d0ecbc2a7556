#!/usr/bin/env bash
# `backup pg-base` of the ~2.5 GB bench cluster under pipeline.memory-limit 32, 48 and 64 MiB,
# in one run, to the same SeaweedFS over HTTPS, with pgBackRest's full backup beside it as the
# peer's figure: wall time, throughput (PGDATA bytes / wall), peak RSS (the agent's own VmHWM
# and the largest process's), the streams and part size the planner chose.
# Medians of REPEAT (default 3) rounds. Needs the cluster of benches/pg_dump_e2e.sh prepare.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

REPEAT=${REPEAT:-3}
LIMITS=${LIMITS:-"32MiB 48MiB 64MiB"}
bench_setup memlimit
apt_install pgbackrest openssl time bc
command -v aws >/dev/null || python3 -m pip install -q awscli

WEED_PID=
trap bench_cleanup EXIT

bench_https_cluster
bench_pgbackrest
prefix_bytes() { echo "aws s3 ls --recursive s3://bench/$1 | awk '{s+=\$3} END {print s+0}'"; }
last_stored="GC_BACKUP_CONFIG='$work/gc-backup.toml' '$GC_BACKUP' list --kind pg-base --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1][\"stored_bytes\"])'"

log "warming the page cache with PGDATA"
tar -cf - -C "$pgdata" . 2>/dev/null | cat >/dev/null || true

results="$work/results"
: >"$results"
plans="$work/plans"
: >"$plans"
for round in $(seq 1 "$REPEAT"); do
  set_archive_command "GC_BACKUP_CONFIG=$work/gc-backup.toml $work/gc-backup wal-push %p"
  for limit in $LIMITS; do
    bench_measure "$results" "gc-backup pg-base, memory-limit $limit" "$last_stored" \
      "GC_BACKUP_CONFIG='$work/gc-backup.toml' GC_BACKUP_LOG_FORMAT=json GC_BACKUP_LOG=gc_backup=debug \
       GC_BACKUP_MEMORY_LIMIT=$limit PGDATA='$pgdata' '$GC_BACKUP' backup pg-base"
    grep -o '"streams":[0-9]*,"part_size":[0-9]*,"frame_bytes":[0-9]*' "$work/err" | head -n 1 |
      sed "s/^/$limit\t/" >>"$plans" || true
  done
  set_archive_command "pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p"
  before_bytes=$(bash -c "$(prefix_bytes pgbackrest/backup)")
  bench_measure "$results" "pgbackrest backup (process-max 2, zst 1)" \
    "echo \$((\$($(prefix_bytes pgbackrest/backup)) - $before_bytes))" \
    "runuser -u postgres -- pgbackrest --config='$work/pgbackrest.conf' --stanza=bench --type=full backup"
done

python3 - "$results" "$pgdata_bytes" "$plans" <<'PY'
import sys, re
runs = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    runs.setdefault(f[0], []).append(f)
pgdata = int(sys.argv[2])
plans = {}
for line in open(sys.argv[3]):
    limit, rest = line.rstrip("\n").split("\t", 1)
    n = dict(re.findall(r'"(\w+)":(\d+)', rest))
    plans[limit] = f"{n['streams']} x {int(n['part_size']) >> 20} MiB parts, {int(n['frame_bytes']) >> 20} MiB frames"
peer = None
print(f"PGDATA without pg_wal: {pgdata / 2**30:.2f} GiB, {len(next(iter(runs.values())))} rounds (medians)")
print(f"{'run':42} {'wall s':>7} {'MiB/s':>7} {'agent RSS':>9} {'max RSS':>7}  plan")
rows = []
for name, group in runs.items():
    group.sort(key=lambda f: float(f[1]))
    f = group[(len(group) - 1) // 2]
    rows.append((name, f))
    if name.startswith("pgbackrest"):
        peer = float(f[1])
for name, f in rows:
    wall = float(f[1])
    limit = name.rsplit(" ", 1)[-1] if "memory-limit" in name else ""
    print(f"{name:42} {wall:7.2f} {pgdata / 2**20 / wall:7.1f} {f[4]:>9} {int(f[3]):7d}  {plans.get(limit, '')}"
          + (f"  ({peer / wall:.2f}x pgBackRest's speed)" if peer and limit else ""))
print("agent RSS: gc-backup's own peak (VmHWM, MiB); max RSS: the largest process of the run (MiB).")
PY
