#!/usr/bin/env bash
# Restoring one small database out of a cluster with a large one, side by side: pgvault
# and pgBackRest (both `--db-include`), each also restoring the whole cluster, from one
# backup each of the same server. The large database is pgbench scale SCALE (default
# 100, ~1.5 GiB) in database "big"; the small one 200,000 rows in database "small".
# Wall seconds, CPU seconds, peak RSS (medians of REPEAT, the tools alternating, the page
# cache dropped before each) and the restored directory's bytes on disk.
#
#   bash bench/db-include.sh            SCALE=100 REPEAT=3 LEVEL=3
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SCALE=${SCALE:-100}
REPEAT=${REPEAT:-3}
LEVEL=${LEVEL:-3}

port=$(free_port)
pgdata="$WORK/pgdata"
as_pg mkdir -p "$WORK/pgv-repo"
as_pg bash -c "umask 077; echo bench-passphrase > $WORK/passphrase"
as_pg "$PGVAULT" --repo "$WORK/pgv-repo" --passphrase-file "$WORK/passphrase" init --compression "zstd:$LEVEL" >/dev/null
pgv=$(wrapper pgv "$PGVAULT" --repo "$WORK/pgv-repo" --passphrase-file "$WORK/passphrase" --jobs 2 -q)
pgbr=$(pgbackrest_stanza "$pgdata" "$port" "$LEVEL")
new_server "$pgdata" "$port" "archive_mode = on" "wal_level = replica" \
    "archive_command = '$PGVAULT --repo $WORK/pgv-repo --passphrase-file $WORK/passphrase archive-push %p && pgbackrest --config=$WORK/pgbackrest.conf --stanza=bench archive-push %p'"
conninfo="host=127.0.0.1 port=$port user=postgres"
as_pg "$PGVAULT" --repo "$WORK/pgv-repo" --passphrase-file "$WORK/passphrase" setup --pg-conn "$conninfo" >/dev/null
"$pgbr" stanza-create >/dev/null
echo "==> pgbench -i -s $SCALE into database big; 200,000 rows into database small" >&2
sql "$port" "CREATE DATABASE big" >/dev/null
sql "$port" "CREATE DATABASE small" >/dev/null
as_pg "$PG_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres big >/dev/null 2>&1
sql "$port" "CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 200000) g" small >/dev/null
sql "$port" "CHECKPOINT" >/dev/null
wait_archived "$port"
"$pgv" backup --fast --pg-conn "$conninfo" --pgdata "$pgdata" >/dev/null
"$pgbr" --type=full backup

for _ in $(seq "$REPEAT"); do
    for scope in whole small; do
        pgv_only=() pgbr_only=()
        if [ "$scope" = small ]; then
            pgv_only=(--db-include small)
            pgbr_only=(--db-include=small)
        fi
        rm -rf "$WORK/r-pgv" "$WORK/r-pgbr"
        drop_caches
        measure "pgvault-$scope" "$WORK/bin/synced" "$WORK" "$pgv" restore --pgdata "$WORK/r-pgv" --target immediate "${pgv_only[@]}"
        du -s --block-size=1 "$WORK/r-pgv" | cut -f1 > "$WORK/pgvault-$scope.bytes"
        drop_caches
        measure "pgbackrest-$scope" "$WORK/bin/synced" "$WORK" "$pgbr" --pg1-path="$WORK/r-pgbr" --type=immediate "${pgbr_only[@]}" restore
        du -s --block-size=1 "$WORK/r-pgbr" | cut -f1 > "$WORK/pgbackrest-$scope.bytes"
    done
done

size=$(du -sb --exclude=pg_wal "$pgdata" | cut -f1)
header "restore of one database: pgbench scale $SCALE in database big, 200,000 rows in small ($(numfmt --to=iec "$size") without WAL); median of $REPEAT; zstd:$LEVEL, --jobs 2 / process-max 2"
printf '%-20s %9s %9s %9s %14s\n' step seconds "CPU s" "RSS MiB" "bytes on disk"
for step in pgvault-whole pgbackrest-whole pgvault-small pgbackrest-small; do
    printf '%-20s %9s %9s %9s %14s\n' "$step" "$(field "$step" 1)" "$(field "$step" 2)" "$(field "$step" 3)" \
        "$(numfmt --to=iec "$(cat "$WORK/$step.bytes")")"
done
echo "time ratios (pgBackRest / pgvault; > 1 means pgvault is faster):"
echo "  whole: $(ratio "$(field pgbackrest-whole 1)" "$(field pgvault-whole 1)")"
echo "  small: $(ratio "$(field pgbackrest-small 1)" "$(field pgvault-small 1)")"
echo "one database against the whole cluster (whole / small): pgvault $(ratio "$(field pgvault-whole 1)" "$(field pgvault-small 1)"), pgBackRest $(ratio "$(field pgbackrest-whole 1)" "$(field pgbackrest-small 1)")"
