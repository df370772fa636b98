#!/usr/bin/env bash
# Storing into an S3-compatible server over a link of limited rate. SIZE (default 1 GiB)
# of rows of random and repetitive text (the text dataset of backup-compare.sh, ~5x with
# zstd) is stored as a file tree: into a local repository (the compression alone), then
# into a loopback moto S3 server with loopback limited to each of RATES by a token
# bucket (`tc qdisc tbf` on `lo`: needs root and CONFIG_NET_SCH_TBF; "none": no limit).
# The transfer floor is stored bytes / rate. "vs ideal" = wall time over the larger of
# the local run's and the floor: 1.00 when compressing and uploading overlap fully.
#
#   bash bench/s3-upload.sh      SIZE=1G RATES="none 1gbit 400mbit" JOBS=2 REPEAT=3
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SIZE=${SIZE:-1G}
RATES=${RATES:-"none 1gbit 400mbit"}
JOBS=${JOBS:-2}
REPEAT=${REPEAT:-3}
bytes=$(numfmt --from=iec "$SIZE")

limited=
finish() {
    if [ -n "$limited" ]; then tc qdisc del dev lo root 2>/dev/null || true; fi
    bench_cleanup
}
trap finish EXIT

echo "==> making $SIZE of text rows" >&2
port=$(free_port)
new_server "$WORK/pgdata" "$port"
rows=$(( bytes / 100 ))
sql "$port" "CREATE TABLE texts (id int, payload text)" >/dev/null
sql "$port" "INSERT INTO texts SELECT g, md5(random()::text) || ' ' || repeat(substr(md5(g::text), 1, 8) || ' ', 10) FROM generate_series(1, $rows) g" >/dev/null
relation=$(sql "$port" "SELECT pg_relation_filepath('texts')")
stop_server "$WORK/pgdata"
mkdir -p "$WORK/data"
{ cat "$WORK/pgdata/$relation"* || true; } | head -c "$bytes" > "$WORK/data/texts"   # cat ends on SIGPIPE
rm -rf "$WORK/pgdata"
cat "$WORK/data/texts" > /dev/null   # cached for every run alike

start_moto bench
export PGVAULT_PASSPHRASE=bench-passphrase PGVAULT_KEY_CACHE=off

store() { # NAME REPO
    "$PGVAULT" --repo "$2" init --compression zstd:3 >/dev/null 2>&1
    measure "$1" "$PGVAULT" --repo "$2" --jobs "$JOBS" -q snapshot create --path "$WORK/data"
}
for i in $(seq "$REPEAT"); do
    rm -rf "$WORK/repo"
    store local "$WORK/repo"
done
stored=$(du -sb "$WORK/repo/data" | cut -f1)
for rate in $RATES; do
    if [ "$rate" != none ]; then
        tc qdisc add dev lo root tbf rate "$rate" burst 1mb latency 200ms
        limited=1
    fi
    for i in $(seq "$REPEAT"); do store "s3-$rate" "s3://bench/$rate-$i"; done
    if [ -n "$limited" ]; then
        tc qdisc del dev lo root
        limited=
    fi
done

header "store into S3 over a limited link: $(numfmt --to=iec "$bytes") of text rows, $(numfmt --to=iec "$stored") stored, --jobs $JOBS, zstd:3, encrypted; median of $REPEAT"
printf '%-16s %9s %9s %9s %12s %9s\n' run seconds "CPU s" "RSS MiB" "floor s" "vs ideal"
local_wall=$(field local 1)
printf '%-16s %9s %9s %9s\n' local "$local_wall" "$(field local 2)" "$(field local 3)"
for rate in $RATES; do
    floor=0
    if [ "$rate" != none ]; then
        bits=${rate%bit}
        floor=$(awk -v b="$stored" -v r="$(numfmt --from=si "${bits^^}")" 'BEGIN { printf "%.2f", b * 8 / r }')
    fi
    ideal=$(awk -v a="$local_wall" -v b="$floor" 'BEGIN { print (a > b ? a : b) }')
    wall=$(field "s3-$rate" 1)
    printf '%-16s %9s %9s %9s %12s %9s\n' "s3-$rate" "$wall" "$(field "s3-$rate" 2)" "$(field "s3-$rate" 3)" "$floor" "$(ratio "$wall" "$ideal")"
done
