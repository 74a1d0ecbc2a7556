#!/usr/bin/env bash
# etcd snapshot of a member holding a few hundred MB, to the same SeaweedFS, side by side:
#
#   gc-backup backup etcd                                     (Maintenance.Snapshot, streamed)
#   etcdctl snapshot save f && zstd -1 f && aws s3 cp f.zst   the file-then-upload way
#
# Wall time, CPU, peak RSS (largest process; gc-backup's own as it logs it), stored bytes,
# ratios. The data set: KEYS Kubernetes-like objects of ~3 KiB (JSON-ish text with a random
# part), loaded through etcd's gRPC gateway. One run (REPEAT=n for more, medians shown).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

REPEAT=${REPEAT:-1}
KEYS=${KEYS:-100000}
ensure_rust
ensure_seaweedfs
apt_install etcd-server etcd-client zstd time bc
command -v aws >/dev/null || python3 -m pip install -q awscli

work=$(mktemp -d /var/tmp/gcb-etcdbench.XXXXXX)
ETCD_PID=
WEED_PID=
cleanup() {
  stop_pid "$ETCD_PID"
  stop_pid "$WEED_PID"
  rm -rf "$work"
}
trap cleanup EXIT

log "building gc-backup (release)"
cargo build --release --locked --quiet
GC_BACKUP="$ROOT/target/release/gc-backup"

start_seaweedfs "$work/s3" bench
client_port=$(free_port)
peer_port=$(free_port)
endpoint="http://127.0.0.1:$client_port"
etcd --name bench --data-dir "$work/etcd" --quota-backend-bytes $((4 * 1024 * 1024 * 1024)) \
  --listen-client-urls "$endpoint" --advertise-client-urls "$endpoint" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "bench=http://127.0.0.1:$peer_port" --log-level warn --logger zap \
  >"$work/etcd.log" 2>&1 &
ETCD_PID=$!
export ETCDCTL_API=3
until etcdctl --endpoints "$endpoint" endpoint health >/dev/null 2>&1; do sleep 0.2; done

log "loading $KEYS objects of ~3 KiB"
python3 - "$client_port" "$KEYS" <<'PY'
import base64, http.client, json, os, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port)
template = ('{"apiVersion":"v1","kind":"Pod","metadata":{"name":"pod-%d","namespace":"gc-storage",'
            '"labels":{"app":"gc-storage-api","tier":"backend"},"annotations":{"checksum":"%s"}},'
            '"spec":{"containers":[{"name":"api","image":"gc-storage/api:1.%d","resources":'
            '{"requests":{"cpu":"250m","memory":"256Mi"}}}]},"status":{"phase":"Running"}}')
for i in range(n):
    value = (template % (i, base64.b64encode(os.urandom(900)).decode(), i % 40)) * 2
    body = json.dumps({"key": base64.b64encode(b"/registry/pods/gc-storage/pod-%d" % i).decode(),
                       "value": base64.b64encode(value.encode()).decode()})
    conn.request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        sys.exit(f"put failed: {response.status}")
PY
log "dataset: $(etcdctl --endpoints "$endpoint" endpoint status -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Status"]["dbSize"] // 2**20, "MiB")')"

results="$work/results"
: >"$results"
s3_size() { echo "aws s3api head-object --bucket bench --key '$1' --query ContentLength --output text"; }

for round in $(seq 1 "$REPEAT"); do
  bench_measure "$results" "gc-backup backup etcd" \
    "GC_BACKUP_STORE=s3://bench/gcb '$GC_BACKUP' list --kind etcd --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1][\"stored_bytes\"])'" \
    "GC_BACKUP_STORE=s3://bench/gcb GC_BACKUP_LOG_FORMAT=json '$GC_BACKUP' backup etcd --endpoints '$endpoint'"
  bench_measure "$results" "etcdctl snapshot save && zstd -1 && aws s3 cp" \
    "$(s3_size "file/snapshot-$round.db.zst")" \
    "etcdctl --endpoints '$endpoint' snapshot save '$work/snapshot.db' >/dev/null \
     && zstd -1 -q --rm '$work/snapshot.db' \
     && aws s3 cp --quiet '$work/snapshot.db.zst' s3://bench/file/snapshot-$round.db.zst \
     && rm -f '$work/snapshot.db.zst'"
done

bench_table "$results" "gc-backup backup etcd"
