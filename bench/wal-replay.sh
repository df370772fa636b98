#!/usr/bin/env bash
# Recovery through archive-get: a backup, then SEGMENTS (default 64, i.e. 1 GiB) of WAL
# archived into a local repository and copied (`pgvault repo copy`) into a repository on
# a loopback S3 server (moto). The same backup is restored from each and recovered to the
# end of the archive; the clock runs from server start until recovery has ended. With
# prefetch (default 16 segments ahead) the S3 replay should not be latency-bound.
#
#   bash bench/wal-replay.sh            SEGMENTS=64 PREFETCH=16
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SEGMENTS=${SEGMENTS:-64}
PREFETCH=${PREFETCH:-16}
start_moto pgvault-bench

echo "bench passphrase" | as_pg tee "$WORK/passphrase" >/dev/null
echo "test" | as_pg tee "$WORK/s3-secret" >/dev/null
as_pg tee "$WORK/pgvault.toml" >/dev/null <<CONF
[repos.local]
url = "$WORK/repo"
passphrase-file = "$WORK/passphrase"
[repos.s3]
url = "s3://pgvault-bench/replay"
passphrase-file = "$WORK/passphrase"
s3-endpoint = "http://127.0.0.1:$MOTO_PORT"
s3-region = "us-east-1"
s3-access-key-id = "test"
s3-secret-access-key-file = "$WORK/s3-secret"
[clusters.main]
spool-path = "$WORK/spool"
archive-get-prefetch = $PREFETCH
CONF
pgvault() { as_pg env -u PGVAULT_REPO "$PGVAULT" --config "$WORK/pgvault.toml" "$@"; }
pgvault --repo local init >/dev/null
pgvault --repo s3 init >/dev/null

echo "==> source server, backup, $SEGMENTS segments of WAL" >&2
PORT=$(free_port)
new_server "$WORK/source" "$PORT" "wal_level = replica" "archive_mode = on" "archive_command = ''"
pgvault --repo local setup --apply --pg-conn "host=127.0.0.1 port=$PORT user=postgres" >/dev/null
pgvault --repo local backup --fast --pg-conn "host=127.0.0.1 port=$PORT user=postgres" --pgdata "$WORK/source" >/dev/null 2>>"$WORK/steps.log"
sql "$PORT" "CREATE TABLE filler (id bigint, pad text)"
start_lsn=$(sql "$PORT" "SELECT pg_current_wal_lsn()")
target=$((SEGMENTS * 16 * 1024 * 1024))
while [ "$(sql "$PORT" "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$start_lsn')::bigint")" -lt "$target" ]; do
    sql "$PORT" "INSERT INTO filler SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 200000) g"
done
expected=$(sql "$PORT" "SELECT count(*) FROM filler")
last=$(sql "$PORT" "SELECT pg_walfile_name(pg_switch_wal())")
while [ "$(sql "$PORT" "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")" \< "$last" ]; do sleep 0.2; done
stop_server "$WORK/source"
echo "==> copying backup and WAL to S3" >&2
pgvault repo copy --from local --to s3 >/dev/null 2>>"$WORK/steps.log"

header "WAL replay through archive-get: $SEGMENTS segments, prefetch $PREFETCH, local directory vs loopback S3 (moto)"
printf '%-14s %10s %10s\n' "repository" "seconds" "MB/s"
for repo in local s3; do
    dir="$WORK/restore-$repo"
    pgvault --repo "$repo" restore --pgdata "$dir" --archive-mode off >/dev/null 2>>"$WORK/steps.log"
    rm -rf "$WORK/spool/main/archive-in"
    port=$(free_port)
    printf "port = %s\nunix_socket_directories = '%s'\n" "$port" "$WORK" | as_pg tee -a "$dir/postgresql.conf" >/dev/null
    started=$(date +%s.%N)
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir.log" -w -t 600 start >/dev/null
    SERVERS+=("$dir")
    while [ "$(sql "$port" "SELECT pg_is_in_recovery()" 2>/dev/null || echo t)" != f ]; do sleep 0.05; done
    ended=$(date +%s.%N)
    got=$(sql "$port" "SELECT count(*) FROM filler")
    [ "$got" = "$expected" ] || { echo "restored $got rows, expected $expected" >&2; exit 1; }
    seconds=$(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.2f", b - a }')
    printf '%-14s %10s %10s\n' "$repo" "$seconds" "$(awk -v s="$seconds" -v n="$SEGMENTS" 'BEGIN { printf "%.0f", n * 16.777 / s }')"
    echo "$repo $seconds" >> "$WORK/replay"
    stop_server "$dir"
done
local_s=$(awk '$1 == "local" { print $2 }' "$WORK/replay")
s3_s=$(awk '$1 == "s3" { print $2 }' "$WORK/replay")
echo "S3 / local replay time: $(ratio "$s3_s" "$local_s")"
