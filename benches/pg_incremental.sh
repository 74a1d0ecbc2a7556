#!/usr/bin/env bash
# Incremental base backups of the ~2.5 GB bench cluster, side by side in one run, SeaweedFS
# over HTTPS, WAL archived to both repositories all along:
#
#   a full of each:  gc-backup backup pg-base          pgbackrest backup --type=full
#   then after each of: an UPDATE of 0.1% of the files rows (by id range: under 1% of the
#   relation blocks, the targets' premise), one of 1% of them (about 5% of the blocks: each
#   row's new version and its entries in two indexes on random keys), pgbench -c 4 -T 60:
#     gc-backup backup pg-base --incremental      (parent: the previous gc-backup backup)
#     pgbackrest backup --type=incr               (parent: the previous pgBackRest backup)
#     pgbackrest backup --type=diff               (against pgBackRest's full)
#
# pgBackRest 2.45 (Debian's) compares whole files (size and time); block incremental came in
# 2.46. Wall time, CPU seconds, peak RSS, stored bytes, and the share of relation blocks the
# incremental stored (from its manifest). Targets (at <= 1% of pages changed): an incremental
# stores <= 10% of a full's bytes in <= 40% of its time, and fewer bytes than pgBackRest's incr.
# Needs the cluster of benches/pg_dump_e2e.sh prepare (BENCH_DIR). The UPDATE and pgbench
# change the bench database; the figures of other benchmarks do not depend on its contents.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

bench_setup incrbench
apt_install pgbackrest openssl time
command -v aws >/dev/null || python3 -m pip install -q awscli

WEED_PID=
trap bench_cleanup EXIT

bench_https_cluster
bench_pgbackrest
set_archive_command "GC_BACKUP_CONFIG=$work/gc-backup.toml $work/gc-backup wal-push %p && pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p"

results="$work/results"
: >"$results"
gc() { echo "GC_BACKUP_CONFIG='$work/gc-backup.toml' GC_BACKUP_LOG_FORMAT=json PGDATA='$pgdata' '$GC_BACKUP' $*"; }
newest_stored="GC_BACKUP_CONFIG='$work/gc-backup.toml' '$GC_BACKUP' list --kind pg-base --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1][\"stored_bytes\"])'"
# pgBackRest's own account of what its newest backup stored (its repository delta): listing
# the bucket undercounted once the repository passed 1,000 objects.
pgbackrest_stored="runuser -u postgres -- pgbackrest --config='$work/pgbackrest.conf' --stanza=bench --output=json info | python3 -c 'import json,sys; print(json.load(sys.stdin)[0][\"backup\"][-1][\"info\"][\"repository\"][\"delta\"])'"
pgbackrest_run() {
  local name=$1 type=$2
  bench_measure "$results" "$name" "$pgbackrest_stored" \
    "runuser -u postgres -- pgbackrest --config='$work/pgbackrest.conf' --stanza=bench --type=$type backup"
}
# The share of the relation files' blocks the newest gc-backup backup stored.
stored_share() {
  local id
  id=$(GC_BACKUP_CONFIG="$work/gc-backup.toml" "$GC_BACKUP" list --kind pg-base --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
  aws s3 cp --quiet "s3://bench/gcb/manifests/pg-base/$id.json" "$work/manifest.json"
  python3 - "$work/manifest.json" <<'PY'
import json, re, sys
m = json.load(open(sys.argv[1]))
facts = m["source"]
block = facts.get("block_size", 8192)
rel = re.compile(r"^(base/\d+|global)/\d+(_(fsm|vm|init))?(\.\d+)?$")
total = stored = 0
for f in facts["files"]:
    if not rel.match(f["path"]):
        continue
    blocks = -(-f["size"] // block)
    total += blocks
    d = f.get("delta")
    if d is None or d == "whole":
        stored += blocks
    elif isinstance(d, dict):
        stored += d["changed"]["blocks"]
print(f"{stored} of {total} relation blocks stored ({100 * stored / max(total, 1):.2f}%)")
PY
}

# Settle the cluster first: autovacuum catching up on an earlier benchmark's pgbench rewrote
# 5% of the blocks between the full and the first incremental in a first run, which is not
# the change being measured.
log "VACUUM ANALYZE and CHECKPOINT, then warming the page cache with PGDATA"
psql -X -q -c "VACUUM ANALYZE" -c CHECKPOINT
tar -cf - -C "$pgdata" . 2>/dev/null | cat >/dev/null || true

bench_measure "$results" "full: gc-backup pg-base" "$newest_stored" "$(gc backup pg-base)"
pgbackrest_run "full: pgbackrest --type=full" full

scenario() {
  local label=$1
  psql -X -q -c CHECKPOINT
  bench_measure "$results" "$label: gc-backup --incremental" "$newest_stored" "$(gc backup pg-base --incremental)"
  log "$label: $(stored_share)"
  stored_share | sed "s/^/$label: /" >>"$work/shares"
  pgbackrest_run "$label: pgbackrest --type=incr" incr
  pgbackrest_run "$label: pgbackrest --type=diff" diff
}
: >"$work/shares"
log "UPDATE of 0.1% of the files rows (1,500 consecutive ids)"
psql -X -q -c "UPDATE files SET modified_at = modified_at + interval '1 day' WHERE id BETWEEN 400001 AND 401500"
scenario "0.1% of files"
log "UPDATE of 1% of the files rows (15,000 consecutive ids)"
psql -X -q -c "UPDATE files SET modified_at = modified_at + interval '1 day' WHERE id BETWEEN 700001 AND 715000"
scenario "1% of files"
log "pgbench -c 4 -T 60"
"$PG_BIN/pgbench" -n -c 4 -T 60 bench >/dev/null 2>&1
scenario "pgbench 60 s"

# A chain of a full and 6 incrementals (3 above, 3 more after short pgbench runs) restored
# against the full alone, base restore only (no --start: the same WAL would follow both).
# Target: the chain within 1.2x of the full.
for n in 4 5 6; do
  "$PG_BIN/pgbench" -n -c 4 -T 5 bench >/dev/null 2>&1
  psql -X -q -c CHECKPOINT
  GC_BACKUP_CONFIG="$work/gc-backup.toml" PGDATA="$pgdata" "$GC_BACKUP" backup pg-base --incremental >/dev/null
done
ids=$(GC_BACKUP_CONFIG="$work/gc-backup.toml" "$GC_BACKUP" list --kind pg-base --json |
  python3 -c 'import json,sys; l=json.load(sys.stdin); print(l[0]["id"], l[-1]["id"], l[-1]["depth"])')
read -r full_id chain_id depth <<<"$ids"
restore_base() {
  local name=$1 id=$2 dir="$work/restored"
  rm -rf "$dir"
  install -d -o postgres -g postgres -m 700 "$dir"
  sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  bench_measure "$work/restores" "$name" "echo 0" \
    "GC_BACKUP_CONFIG='$work/gc-backup.toml' GC_BACKUP_LOG_FORMAT=json '$GC_BACKUP' restore pg --pgdata '$dir' --backup $id"
  cp "$work/err" "/tmp/gc-backup-bench-last-restore.log"
  rm -rf "$dir"
}
: >"$work/restores"
for round in 1 2 3 4 5; do
  restore_base "restore: the full alone" "$full_id"
  restore_base "restore: the chain (full + $depth incrementals)" "$chain_id"
done

# Where the last chain restore spent its time, step by step.
python3 - /tmp/gc-backup-bench-last-restore.log <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        event = json.loads(line)
    except ValueError:
        continue
    fields = event.get("fields", event)
    if "elapsed_ms" in fields:
        extra = f" depth {fields['depth']}, {int(fields.get('raw_bytes', 0)) / 2**20:.0f} MiB raw" if "depth" in fields else ""
        print(f"  {fields.get('message', '')}:{extra} {int(fields['elapsed_ms']) / 1000:.2f} s")
PY
cp "$work/results" "$work/restores" /tmp/ 2>/dev/null || true
cat "$work/shares"
python3 - "$results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
full = next(r for r in rows if r[0].startswith("full: gc-backup"))
fw, fs = float(full[1]), int(full[5])
print(f"{'run':40} {'wall s':>7} {'cpu s':>6} {'RSS MiB':>7} {'agent':>6} {'stored MiB':>10} {'time/full':>9} {'bytes/full':>10}")
for r in rows:
    wall, stored = float(r[1]), int(r[5] or 0)
    print(f"{r[0]:40} {wall:7.2f} {float(r[2]):6.2f} {int(r[3]):7d} {r[4]:>6} {stored / 2**20:10.2f} "
          f"{100 * wall / fw:8.1f}% {100 * stored / fs:9.2f}%")
print("time/full, bytes/full: against gc-backup's full. Targets at <= 1% of pages changed: "
      "<= 40% and <= 10%, and fewer bytes than pgbackrest --type=incr.")
PY
python3 - "$work/restores" <<'PY'
import sys
runs = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    runs.setdefault(f[0], []).append(float(f[1]))
medians = {name: sorted(w)[(len(w) - 1) // 2] for name, w in runs.items()}
names = list(medians)
print()
for name in names:
    print(f"{name:48} {medians[name]:7.2f} s  (runs: {', '.join(f'{w:.2f}' for w in runs[name])})")
print(f"chain / full alone: {medians[names[1]] / medians[names[0]]:.2f}x (target <= 1.2x)")
PY
