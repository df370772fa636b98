#!/usr/bin/env bash
# Legacy restore throughput: a pg_dumpall of a pgbench database of SCALE (default 50),
# gzip'd, openssl-encrypted (-md md5) and split into 64 MiB parts, replayed into a fresh
# server by `pgvault legacy restore` and by the manual pipeline
# `cat parts | openssl enc -d | gunzip | psql`.
#
#   bash bench/legacy-compare.sh        SCALE=50
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SCALE=${SCALE:-50}
port=$(free_port)
new_server "$WORK/source" "$port"
echo "==> pgbench -i -s $SCALE and the legacy backup" >&2
as_pg "$PG_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1
mkdir -p "$WORK/objects"
echo secret-pass > "$WORK/secret"
"$PG_BIN/pg_dumpall" -h 127.0.0.1 -p "$port" -U postgres | gzip -c \
    | openssl enc -aes256 -md md5 -pass pass:secret-pass 2>/dev/null \
    | split -b 64M -d -a 4 - "$WORK/objects/piece."
i=1
for piece in "$WORK"/objects/piece.*; do mv "$piece" "$WORK/objects/pg1-20260101T000000-$i"; i=$((i + 1)); done
echo '{}' > "$WORK/objects/pg1-20260101T000000.json"
encrypted=$(cat "$WORK"/objects/pg1-* | wc -c)
stop_server "$WORK/source"

target=$(free_port)
new_server "$WORK/t1" "$target"
measure pgvault-legacy "$PGVAULT" --jobs 2 -q legacy restore --source "$WORK/objects" --instance pg1 \
    --secret-file "$WORK/secret" --target-conn "host=127.0.0.1 port=$target user=postgres"
stop_server "$WORK/t1"
target2=$(free_port)
new_server "$WORK/t2" "$target2"
manual=$(wrapper manual bash -o pipefail -c "ls $WORK/objects/pg1-20260101T000000-* | sort -t- -k3 -n | xargs cat | openssl enc -d -aes256 -md md5 -pass pass:secret-pass | gunzip | $PG_BIN/psql -X -q -h 127.0.0.1 -p $target2 -U postgres -d postgres >/dev/null 2>&1")
measure manual-pipeline "$manual"

header "legacy restore: pg_dumpall of pgbench scale $SCALE, $(numfmt --to=iec "$encrypted") encrypted in $((i - 1)) parts, local directory"
printf '%-18s %9s %9s %9s %10s\n' method seconds "CPU s" "RSS MiB" "MB/s"
for m in pgvault-legacy manual-pipeline; do
    printf '%-18s %9s %9s %9s %10s\n' "$m" "$(field "$m" 1)" "$(field "$m" 2)" "$(field "$m" 3)" \
        "$(awk -v b="$encrypted" -v w="$(field "$m" 1)" 'BEGIN { printf "%.0f", b / 1e6 / w }')"
done
echo "manual / pgvault time: $(ratio "$(field manual-pipeline 1)" "$(field pgvault-legacy 1)")"
