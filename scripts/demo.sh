#!/usr/bin/env bash
# The main job on an embedded default: a throwaway PostgreSQL 15 cluster and a local
# encrypted repository. init → store the stopped cluster → change data → store again
# (only changes are new) → restore → check the restored cluster with PostgreSQL's own
# tools and compare its data with the source → verify the repository.
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
start_pg "$WORK/pgdata" "$PORT_SRC"
as_pg "$PG_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$PORT_SRC" -U postgres postgres 2>/dev/null
stop_pg "$WORK/pgdata"
du -sh "$WORK/pgdata" | awk '{print "data directory: " $1}'

step "pgvault init (encrypted local repository at $PGVAULT_REPO)"
"$PGVAULT" init

step "pgvault snapshot create: the stopped cluster"
FIRST=$("$PGVAULT" snapshot create --path "$WORK/pgdata" --label demo-first)

step "change some data with pgbench, then snapshot again: only changed chunks are new"
start_pg "$WORK/pgdata" "$PORT_SRC"
as_pg "$PG_BIN/pgbench" -n -t 2000 -h 127.0.0.1 -p "$PORT_SRC" -U postgres postgres >/dev/null 2>&1
SOURCE_SUM=$(psql_at "$PORT_SRC" "select sum(abalance)::text || '/' || count(*) from pgbench_accounts")
SOURCE_HIST=$(psql_at "$PORT_SRC" "select count(*) from pgbench_history")
stop_pg "$WORK/pgdata"
SECOND=$("$PGVAULT" snapshot create --path "$WORK/pgdata" --label demo-second)
"$PGVAULT" snapshot list

step "pgvault snapshot restore $SECOND"
"$PGVAULT" snapshot restore "$SECOND" --target "$WORK/restored"

step "pg_checksums --check on the restored cluster"
as_pg "$PG_BIN/pg_checksums" --check -D "$WORK/restored"

step "start the restored cluster and compare its data with the source"
start_pg "$WORK/restored" "$PORT_RESTORED"
RESTORED_SUM=$(psql_at "$PORT_RESTORED" "select sum(abalance)::text || '/' || count(*) from pgbench_accounts")
RESTORED_HIST=$(psql_at "$PORT_RESTORED" "select count(*) from pgbench_history")
echo "source:   sum(abalance)/rows = $SOURCE_SUM, history rows = $SOURCE_HIST"
echo "restored: sum(abalance)/rows = $RESTORED_SUM, history rows = $RESTORED_HIST"
if [ "$SOURCE_SUM" != "$RESTORED_SUM" ] || [ "$SOURCE_HIST" != "$RESTORED_HIST" ]; then
    echo "error: restored data differs from the source" >&2
    exit 1
fi
as_pg "$PG_BIN/pg_amcheck" -h 127.0.0.1 -p "$PORT_RESTORED" -U postgres --all --install-missing --heapallindexed >/dev/null
echo "pg_amcheck: all relations and indexes consistent"
stop_pg "$WORK/restored"

step "pgvault verify: authenticate every blob of every snapshot"
"$PGVAULT" verify

step "repository size"
du -sh "$WORK/pgdata" "$PGVAULT_REPO" | awk '{print $2 ": " $1}'
echo
echo "demo finished: 2 snapshots ($FIRST, $SECOND), restored and checked"
