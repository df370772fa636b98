#!/usr/bin/env bash
# Store and restore throughput of the repository pipeline on realistic data: a SIZE
# (default 2 GiB) file cut from pgbench_accounts' relation files, stored as a file tree
# (fixed page-aligned chunks, as physical backups are) with zstd-1, zstd-3 and lz4, with
# and without encryption, at --jobs 1 and 2; next to the raw zstd/lz4 CLIs on the same
# file and thread count. MB/s = file bytes / wall seconds; CPU s/GiB = user+sys per GiB.
#
#   bash bench/store-throughput.sh      SIZE=2G COMPRESSIONS="zstd:1 zstd:3 lz4" JOBS="1 2"
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SIZE=${SIZE:-2G}
COMPRESSIONS=${COMPRESSIONS:-"zstd:1 zstd:3 lz4"}
ENCRYPTIONS=${ENCRYPTIONS:-"none xchacha20-poly1305"}
JOBS=${JOBS:-"1 2"}
bytes=$(numfmt --from=iec "$SIZE")

echo "==> making $SIZE of pgbench_accounts data" >&2
port=$(free_port)
new_server "$WORK/pgdata" "$port"
scale=$(( bytes / 13000000 + 1 ))
as_pg "$PG_BIN/pgbench" -q -i -s "$scale" -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1
relation=$(sql "$port" "SELECT pg_relation_filepath('pgbench_accounts')")
stop_server "$WORK/pgdata"
mkdir -p "$WORK/data"
{ cat "$WORK/pgdata/$relation"* || true; } | head -c "$bytes" > "$WORK/data/accounts"   # cat ends on SIGPIPE
rm -rf "$WORK/pgdata"
file="$WORK/data/accounts"
cat "$file" > /dev/null   # cached for every run alike
export PGVAULT_PASSPHRASE=bench-passphrase PGVAULT_KEY_CACHE=off

header "store/restore throughput, $(numfmt --to=iec "$bytes") of pgbench_accounts pages"
printf '%-34s %9s %10s %9s %8s %10s\n' run MB/s "CPU s/GiB" "RSS MiB" "stored" "vs raw"
row() { # name raw_name
    local wall cpu rss mbps cpu_gib overhead=""
    wall=$(field "$1" 1); cpu=$(field "$1" 2); rss=$(field "$1" 3)
    mbps=$(awk -v b="$bytes" -v w="$wall" 'BEGIN { printf "%.0f", b / 1e6 / w }')
    cpu_gib=$(awk -v b="$bytes" -v c="$cpu" 'BEGIN { printf "%.2f", c / (b / 1073741824) }')
    if [ -n "${2:-}" ] && [ -n "$(field "$2" 1)" ]; then
        overhead=$(awk -v a="$wall" -v b="$(field "$2" 1)" 'BEGIN { printf "%+.0f%%", (a / b - 1) * 100 }')
    fi
    printf '%-34s %9s %10s %9s %8s %10s\n' "$1" "$mbps" "$cpu_gib" "$rss" "${3:-}" "$overhead"
}
for jobs in $JOBS; do
    measure "zstd-1-T$jobs" zstd -1 -T"$jobs" -q -f "$file" -o /dev/null
    measure "zstd-3-T$jobs" zstd -3 -T"$jobs" -q -f "$file" -o /dev/null
    row "zstd-1-T$jobs"; row "zstd-3-T$jobs"
done
measure "lz4-1" lz4 -1 -q -f "$file" /dev/null
row "lz4-1"
for compression in $COMPRESSIONS; do
    for encryption in $ENCRYPTIONS; do
        for jobs in $JOBS; do
            repo="$WORK/repo"
            rm -rf "$repo"
            PGVAULT_REPO=$repo "$PGVAULT" init --encryption "$encryption" --compression "$compression" >/dev/null 2>&1
            name="store-${compression/:/-}-${encryption%%-*}-j$jobs"
            measure "$name" "$PGVAULT" --repo "$repo" --jobs "$jobs" -q snapshot create --path "$WORK/data"
            stored=$(du -sh "$repo" | cut -f1)
            case $compression in
                zstd:1) raw="zstd-1-T$jobs" ;; zstd:3) raw="zstd-3-T$jobs" ;; *) raw="lz4-1" ;;
            esac
            row "$name" "$raw" "$stored"
            rm -rf "$WORK/out"
            restore="restore-${compression/:/-}-${encryption%%-*}-j$jobs"
            measure "$restore" "$PGVAULT" --repo "$repo" --jobs "$jobs" -q snapshot restore latest --target "$WORK/out"
            row "$restore"
            cmp "$file" "$WORK/out/accounts"
        done
    done
done
echo "(vs raw: pgvault store wall time over the raw compressor's at the same level and thread count)"
