#!/usr/bin/env bash
# WAL archiving throughput through the real PostgreSQL archiver: SEGMENTS (default 64)
# ready 16 MiB segments are produced with archiving paused (archive_command = ''), then
# an archive_command is set and reloaded and the clock runs until pg_stat_archiver
# reports the last one. Methods, each on a fresh server with the same workload:
#   cp+fsync baseline, pgvault sync, pgvault async (--jobs 2),
#   pgbackrest archive-push sync and async (process-max 2); both tools zstd level 3.
#
#   bash bench/wal-drain.sh            SEGMENTS=64 METHODS="cp pgvault-sync ..."
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SEGMENTS=${SEGMENTS:-64}
METHODS=${METHODS:-"cp pgvault-sync pgvault-async pgbackrest-sync pgbackrest-async"}
if [[ " $METHODS " == *" pgbackrest"* ]] && ! command -v pgbackrest >/dev/null; then
    echo "==> installing pgbackrest" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest >/dev/null
fi

# run METHOD: fresh server, SEGMENTS ready segments, then time the drain.
run() {
    local method=$1 dir="$WORK/$1" port
    port=$(free_port)
    as_pg mkdir -p "$dir"
    new_server "$dir/pgdata" "$port" "archive_mode = on" "archive_command = ''" \
        "wal_level = replica" "wal_compression = off" "checkpoint_timeout = 1h"
    local conninfo="host=127.0.0.1 port=$port user=postgres"
    local archive_command
    case $method in
        cp)
            as_pg mkdir -p "$dir/archive"
            archive_command="test ! -f $dir/archive/%f && cp %p $dir/archive/%f.tmp && sync $dir/archive/%f.tmp && mv $dir/archive/%f.tmp $dir/archive/%f && sync $dir/archive"
            ;;
        pgvault-sync | pgvault-async)
            as_pg env PGVAULT_REPO="$dir/repo" "$PGVAULT" init --encryption none --compression zstd:3 >/dev/null
            local mode=""
            [ "$method" = pgvault-async ] && mode="--async"
            archive_command="$PGVAULT --repo $dir/repo --jobs 2 archive-push $mode %p"
            as_pg env PGVAULT_SPOOL_PATH="$dir/spool" "$PGVAULT" --repo "$dir/repo" setup --pg-conn "$conninfo" >/dev/null
            archive_command="env PGVAULT_SPOOL_PATH=$dir/spool $archive_command"
            ;;
        pgbackrest-sync | pgbackrest-async)
            local async=n
            [ "$method" = pgbackrest-async ] && async=y
            as_pg mkdir -p "$dir/repo" "$dir/spool" "$dir/log" "$dir/lock"
            as_pg tee "$dir/pgbackrest.conf" >/dev/null <<CONF
[global]
repo1-path=$dir/repo
compress-type=zst
compress-level=3
archive-async=$async
spool-path=$dir/spool
process-max=2
log-path=$dir/log
lock-path=$dir/lock
log-level-console=warn
start-fast=y

[bench]
pg1-path=$dir/pgdata
pg1-port=$port
pg1-socket-path=$WORK
CONF
            as_pg pgbackrest --config="$dir/pgbackrest.conf" --stanza=bench stanza-create >/dev/null
            archive_command="pgbackrest --config=$dir/pgbackrest.conf --stanza=bench archive-push %p"
            ;;
    esac
    # The same workload for every method: pgbench plus a switch after every segment.
    sql "$port" "CREATE TABLE filler (id bigint, payload text)" >/dev/null
    local last=""
    for _ in $(seq 1 "$SEGMENTS"); do
        sql "$port" "INSERT INTO filler SELECT g, md5(g::text) || repeat('x', 200) FROM generate_series(1, 40000) g" >/dev/null
        last=$(sql "$port" "SELECT pg_walfile_name(pg_switch_wal())")
    done
    local ready
    ready=$(ls "$dir/pgdata/pg_wal/archive_status/" | grep -c '\.ready$')
    sql "$port" "ALTER SYSTEM SET archive_command = '$(echo "$archive_command" | sed "s/'/''/g")'" >/dev/null
    local start end
    start=$(date +%s.%N)
    sql "$port" "SELECT pg_reload_conf()" >/dev/null
    while [ "$(sql "$port" "SELECT coalesce(last_archived_wal, '') >= '$last' FROM pg_stat_archiver")" != t ]; do
        sleep 0.05
    done
    end=$(date +%s.%N)
    local failed
    failed=$(sql "$port" "SELECT failed_count FROM pg_stat_archiver")
    stop_server "$dir/pgdata"
    awk -v m="$method" -v n="$ready" -v s="$start" -v e="$end" -v f="$failed" \
        'BEGIN { printf "%-18s %8d %9.2f %12.1f %8d\n", m, n, e - s, n / (e - s), f }'
}

header "WAL drain: $SEGMENTS+ ready segments of 16 MiB through the PostgreSQL archiver"
printf '%-18s %8s %9s %12s %8s\n' method segments seconds segments/s failures
results="$WORK/results"
for method in $METHODS; do
    run "$method" | tee -a "$results"
done
rate() { awk -v m="$1" '$1 == m { print $4 }' "$results"; }
if grep -q '^pgvault-sync ' "$results" && grep -q '^pgbackrest-sync ' "$results"; then
    echo "pgvault sync / pgbackrest sync:   $(ratio "$(rate pgvault-sync)" "$(rate pgbackrest-sync)")"
fi
if grep -q '^pgvault-async ' "$results" && grep -q '^pgbackrest-async ' "$results"; then
    echo "pgvault async / pgbackrest async: $(ratio "$(rate pgvault-async)" "$(rate pgbackrest-async)")"
fi
