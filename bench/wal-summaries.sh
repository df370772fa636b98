#!/usr/bin/env bash
# PostgreSQL 17 WAL summaries: a second backup after a small change, with the server's
# summaries (pgvault reads only chunks holding modified blocks) and without (changed
# files are read whole), next to pg_basebackup --incremental on the same server.
# pgbench scale SCALE (default 100), then `pgbench -c 4 -t TXNS` between the backups.
#
#   bash bench/wal-summaries.sh         SCALE=100 TXNS=1000
set -euo pipefail
cd "$(dirname "$0")/.."
PG_BIN=${PG_BIN:-/var/tmp/pgvault-pg/17/bin}
source bench/lib.sh
SCALE=${SCALE:-100}
TXNS=${TXNS:-1000}

# run SUMMARIZE: fresh server, full backup, workload, second backup (timed, its JSON
# report in $WORK/SUMMARIZE/second.json).
run() {
    local summarize=$1 port dir
    port=$(free_port)
    dir="$WORK/$summarize"
    as_pg mkdir -p "$dir"
    as_pg env PGVAULT_REPO="$dir/repo" "$PGVAULT" init --encryption none --compression zstd:3 >/dev/null
    new_server "$dir/pgdata" "$port" "archive_mode = on" "wal_level = replica" \
        "summarize_wal = $summarize" \
        "archive_command = '$PGVAULT --repo $dir/repo archive-push %p'"
    local conninfo="host=127.0.0.1 port=$port user=postgres"
    as_pg "$PGVAULT" --repo "$dir/repo" setup --pg-conn "$conninfo" >/dev/null
    echo "==> summarize_wal = $summarize: pgbench -i -s $SCALE" >&2
    as_pg "$PG_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1
    local backup=("$PGVAULT" --repo "$dir/repo" --jobs 2 -q --output json backup --fast
        --pg-conn "$conninfo" --pgdata "$dir/pgdata")
    as_pg "${backup[@]}" > "$dir/first.json"
    [ "$summarize" = on ] && as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$port" -U postgres \
        -D "$dir/bb-full" --checkpoint=fast >/dev/null
    as_pg "$PG_BIN/pgbench" -n -c 4 -t "$TXNS" -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1
    local second
    second=$(wrapper "second-$summarize" bash -c '"$@" > "$0"' "$dir/second.json" "${backup[@]}")
    measure "pgvault-summaries-$summarize" "$second"
    if [ "$summarize" = on ]; then
        local incremental
        incremental=$(wrapper incremental "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$port" -U postgres \
            --checkpoint=fast --incremental "$dir/bb-full/backup_manifest" -D "$dir/bb-incr")
        measure pg_basebackup-incremental "$incremental"
        du -sb "$dir/bb-incr" | cut -f1 > "$WORK/bb-incr-bytes"
    fi
    stop_server "$dir/pgdata"
}

run off
run on
json() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/$1/second.json" "$2"; }
header "PostgreSQL 17 WAL summaries: pgbench scale $SCALE, second backup after $TXNS×4 transactions"
printf '%-28s %9s %9s %9s %12s %12s\n' step seconds "CPU s" "RSS MiB" read stored
for summarize in off on; do
    step="pgvault-summaries-$summarize"
    printf '%-28s %9s %9s %9s %12s %12s\n' "$step" "$(field "$step" 1)" "$(field "$step" 2)" "$(field "$step" 3)" \
        "$(numfmt --to=iec "$(json "$summarize" read_bytes)")" "$(numfmt --to=iec "$(json "$summarize" stored_bytes)")"
done
printf '%-28s %9s %9s %9s %12s %12s\n' pg_basebackup-incremental "$(field pg_basebackup-incremental 1)" \
    "$(field pg_basebackup-incremental 2)" "$(field pg_basebackup-incremental 3)" "" \
    "$(numfmt --to=iec "$(cat "$WORK/bb-incr-bytes")")"
echo "modified blocks listed by the summaries: $(json on wal_summary_blocks)"
echo "second backup time, summaries on / off: $(ratio "$(field pgvault-summaries-on 1)" "$(field pgvault-summaries-off 1)")"
