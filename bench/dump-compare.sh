#!/usr/bin/env bash
# Logical dumps, side by side: `pgvault dump` of a pgbench database of SCALE (default
# 100) against `pg_dump -Fc` to a file, and restores against `pg_restore`; then a small
# change (CHANGE_ROWS updated accounts) and a second dump: bytes stored by pgvault vs
# the size of a second `pg_dump -Fc` file.
#
#   bash bench/dump-compare.sh          SCALE=100 CHANGE_ROWS=1000
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SCALE=${SCALE:-100}
CHANGE_ROWS=${CHANGE_ROWS:-1000}
port=$(free_port)
new_server "$WORK/pgdata" "$port"
conninfo="host=127.0.0.1 port=$port user=postgres dbname=postgres"
sql "$port" "CREATE DATABASE bench" >/dev/null
echo "==> pgbench -i -s $SCALE" >&2
as_pg "$PG_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres bench >/dev/null 2>&1
db_bytes=$(sql "$port" "SELECT pg_database_size('bench')")
as_pg env PGVAULT_REPO="$WORK/repo" "$PGVAULT" init --encryption none --compression zstd:3 >/dev/null
pgv=$(wrapper pgv "$PGVAULT" --repo "$WORK/repo" --jobs 2 -q --pg-bin "$PG_BIN" --pg-conn "$conninfo")
pg_dump=$(wrapper pg_dump "$PG_BIN/pg_dump" -h 127.0.0.1 -p "$port" -U postgres -Fc -d bench -f)
pg_restore=$(wrapper pg_restore "$PG_BIN/pg_restore" -h 127.0.0.1 -p "$port" -U postgres --create -d postgres)
dropdb() { sql "$port" "DROP DATABASE IF EXISTS $1" >/dev/null; }

measure pgvault-dump-1 "$pgv" dump --database bench
repo1=$(du -sb "$WORK/repo" | cut -f1)
measure pg_dump-1 "$pg_dump" "$WORK/bench-1.dump"
file1=$(stat -c %s "$WORK/bench-1.dump")

sql "$port" "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid IN (SELECT (random() * $SCALE * 100000)::int FROM generate_series(1, $CHANGE_ROWS))" bench >/dev/null
measure pgvault-dump-2 "$pgv" dump --database bench
repo2=$(du -sb "$WORK/repo" | cut -f1)
measure pg_dump-2 "$pg_dump" "$WORK/bench-2.dump"
file2=$(stat -c %s "$WORK/bench-2.dump")

dropdb bench
measure pgvault-restore "$pgv" dump restore --database bench --jobs 1
dropdb bench
measure pg_restore "$pg_restore" "$WORK/bench-2.dump"

header "logical dump: pgbench scale $SCALE ($(numfmt --to=iec "$db_bytes") database), $CHANGE_ROWS rows changed between dumps"
printf '%-18s %9s %9s %9s %14s\n' step seconds "CPU s" "RSS MiB" "bytes"
line() { printf '%-18s %9s %9s %9s %14s\n' "$1" "$(field "$1" 1)" "$(field "$1" 2)" "$(field "$1" 3)" "${2:-}"; }
line pgvault-dump-1 "$(numfmt --to=iec "$repo1") stored"
line pg_dump-1 "$(numfmt --to=iec "$file1") file"
line pgvault-dump-2 "+$(numfmt --to=iec $((repo2 - repo1))) stored"
line pg_dump-2 "$(numfmt --to=iec "$file2") file"
line pgvault-restore
line pg_restore
echo "time ratios (pg_dump or pg_restore / pgvault; > 1 means pgvault is faster):"
echo "  dump: $(ratio "$(field pg_dump-1 1)" "$(field pgvault-dump-1 1)")  restore: $(ratio "$(field pg_restore 1)" "$(field pgvault-restore 1)")"
echo "second dump stores $(ratio $((repo2 - repo1)) "$file2") of a pg_dump -Fc file"
