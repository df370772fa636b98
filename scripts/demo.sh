#!/usr/bin/env bash
# The main job on an embedded default: a throwaway PostgreSQL 15 cluster and a local
# encrypted repository. init → setup (WAL archiving) → backup → workload → second backup
# (only changes are stored) → restore point → an "accident" (DROP TABLE) → point-in-time
# restore to just before it → PostgreSQL's own checks and a data comparison with the
# source at the restore point → verify the repository.
# Everything lives under one temporary directory, removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
ensure_apt_packages
ensure_rust

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
SCALE=${SCALE:-10}
echo "==> building pgvault"
cargo build --quiet --locked -p pgvault
PGVAULT="$CARGO_TARGET_DIR/debug/pgvault"

WORK=$(mktemp -d /tmp/pgvault-demo.XXXXXX)
chmod 755 "$WORK"
PORT_SRC=${PORT_SRC:-55432}
PORT_RESTORED=${PORT_RESTORED:-55433}
# PostgreSQL refuses to run as root; use the postgres account when we are root.
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$WORK" postgres
    as_pg() { runuser -u postgres -- "$@"; }
    chown postgres "$WORK"
else
    as_pg() { "$@"; }
fi
cleanup() {
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -m immediate stop >/dev/null 2>&1 || true
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/restored" -m immediate stop >/dev/null 2>&1 || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
step() { printf '\n==> %s\n' "$*"; }

export PGVAULT_REPO="$WORK/repo"
export PGVAULT_PASSPHRASE_FILE="$WORK/passphrase"
head -c 24 /dev/urandom | base64 > "$PGVAULT_PASSPHRASE_FILE"
chmod 600 "$PGVAULT_PASSPHRASE_FILE"

step "throwaway PostgreSQL 15 cluster with data checksums, pgbench scale $SCALE"
as_pg mkdir -p "$WORK/pgdata"
as_pg "$PG_BIN/initdb" --data-checksums -U postgres -D "$WORK/pgdata" >/dev/null 2>&1
start_pg() { as_pg "$PG_BIN/pg_ctl" -D "$1" -l "$WORK/$(basename "$1").log" \
    -o "-p $2 -c listen_addresses=127.0.0.1 -k /tmp" -w start >/dev/null; }
stop_pg() { as_pg "$PG_BIN/pg_ctl" -D "$1" -m fast -w stop >/dev/null; }
psql_at() { as_pg "$PG_BIN/psql" -X -q -A -t -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"; }
pgbench_src() { as_pg "$PG_BIN/pgbench" -h 127.0.0.1 -p "$PORT_SRC" -U postgres "$@" postgres >/dev/null 2>&1; }
state_at() { psql_at "$1" "select (select sum(abalance) from pgbench_accounts)::text || '/' || (select count(*) from pgbench_history)::text"; }
start_pg "$WORK/pgdata" "$PORT_SRC"
pgbench_src -q -i -s "$SCALE"
du -sh "$WORK/pgdata" | awk '{print "data directory: " $1}'
# The archiver runs as postgres: it must be able to read the repository and passphrase.
chown -R postgres "$WORK" 2>/dev/null || true

SRC_CONN="host=127.0.0.1 port=$PORT_SRC user=postgres dbname=postgres"
step "pgvault init (encrypted local repository at $PGVAULT_REPO)"
as_pg "$PGVAULT" init

step "pgvault setup --apply: register the cluster, set archive_command (restart for archive_mode)"
as_pg "$PGVAULT" setup --pg-conn "$SRC_CONN" --apply
stop_pg "$WORK/pgdata"
start_pg "$WORK/pgdata" "$PORT_SRC"

step "pgvault check: a switched segment arrives in the repository"
as_pg "$PGVAULT" check --pg-conn "$SRC_CONN"

step "pgvault backup: the first, full one"
as_pg "$PGVAULT" backup --fast --pg-conn "$SRC_CONN" --pgdata "$WORK/pgdata" --label demo-first

step "pgbench workload, then a second backup: unchanged files are not read, only changed chunks stored"
pgbench_src -n -c 2 -t 1000
as_pg "$PGVAULT" backup --fast --pg-conn "$SRC_CONN" --pgdata "$WORK/pgdata" --label demo-second

step "more workload, a restore point, then the accident: DROP TABLE pgbench_history"
pgbench_src -n -t 500
psql_at "$PORT_SRC" "select pg_create_restore_point('before-accident')" >/dev/null
SOURCE_STATE=$(state_at "$PORT_SRC")
pgbench_src -n -t 500
psql_at "$PORT_SRC" "drop table pgbench_history"
as_pg "$PGVAULT" check --pg-conn "$SRC_CONN" >/dev/null   # the WAL up to here is archived
echo "state at the restore point: sum(abalance)/history rows = $SOURCE_STATE"

step "pgvault restore --target-name before-accident (point-in-time recovery)"
as_pg "$PGVAULT" restore --pgdata "$WORK/restored" --target-name before-accident \
    --target-action promote --archive-mode off
start_pg "$WORK/restored" "$PORT_RESTORED"
for _ in $(seq 1 600); do
    [ "$(psql_at "$PORT_RESTORED" "select pg_is_in_recovery()" 2>/dev/null)" = f ] && break
    sleep 0.2
done
RESTORED_STATE=$(state_at "$PORT_RESTORED")
echo "source at the restore point: $SOURCE_STATE"
echo "restored:                    $RESTORED_STATE"
if [ "$SOURCE_STATE" != "$RESTORED_STATE" ]; then
    echo "error: restored data differs from the source at the restore point" >&2
    exit 1
fi

step "pg_amcheck --heapallindexed and pg_checksums --check on the restored cluster"
as_pg "$PG_BIN/pg_amcheck" -h 127.0.0.1 -p "$PORT_RESTORED" -U postgres --all --install-missing --heapallindexed >/dev/null
echo "pg_amcheck: all relations and indexes consistent"
stop_pg "$WORK/restored"
as_pg "$PG_BIN/pg_checksums" --check -D "$WORK/restored"

step "pgvault verify: authenticate every blob every backup needs"
as_pg "$PGVAULT" verify
as_pg "$PGVAULT" snapshot list

step "sizes"
du -sh "$WORK/pgdata" "$PGVAULT_REPO" | awk '{print $2 ": " $1}'
echo
echo "demo finished: 2 backups, point-in-time restore to 'before-accident', checked by PostgreSQL's tools and against the source"
