#!/usr/bin/env bash
# Chunk-size study: how much an incremental snapshot of a PostgreSQL data directory
# stores, and how many index entries the data needs, for fixed chunk sizes from 8 KiB
# (one page) to 256 KiB. The same two states of one pgbench cluster (before and after a
# workload) are stored into one fresh repository per chunk size, so every size sees
# identical bytes. Measures bytes, not time: safe to run on a busy machine.
#
#   bash bench/chunk-size.sh            SCALE=20 TXNS="2000 20000" SIZES="8 16 32 64 128 256"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
ensure_rust
SCALE=${SCALE:-20}
TXNS=${TXNS:-"2000 20000"}
SIZES=${SIZES:-"8 16 32 64 128 256"}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
cargo build --quiet --release --locked -p pgvault
PGVAULT="$CARGO_TARGET_DIR/release/pgvault"

WORK=$(mktemp -d /var/tmp/pgvault-chunkbench.XXXXXX)
chmod 755 "$WORK"
trap 'runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$WORK"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pg() { as_pg "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/server.log" \
    -o "-p $PORT -c listen_addresses=127.0.0.1 -k $WORK -c max_wal_size=4GB" -w "$@" >/dev/null; }
bench() { as_pg "$PG_BIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres "$@" postgres >/dev/null 2>&1; }

as_pg "$PG_BIN/initdb" --data-checksums -U postgres -D "$WORK/pgdata" >/dev/null 2>&1
pg start
bench -i -s "$SCALE" -q
pg stop -m fast
# WAL is not part of a backup: leave pg_wal out of the copies.
copy_state() { as_pg cp -a "$WORK/pgdata" "$WORK/$1"; rm -rf "$WORK/$1/pg_wal"/0*; }
copy_state state0
for txns in $TXNS; do
    pg start
    bench -n -t "$txns" -c 2
    pg stop -m fast
    copy_state "state-$txns"
done

echo "chunk-size study $(date -u +%FT%TZ), pgvault $(git rev-parse --short HEAD), pgbench scale $SCALE"
echo "data directory without WAL: $(du -sb "$WORK/state0" | cut -f1) bytes"
echo "each row: what storing the data directory again after N more transactions added"
printf '%-10s %-8s %14s %14s %12s %12s\n' chunk_KiB txns new_logical new_stored new_blobs index_entries
for size in $SIZES; do
    repo="$WORK/repo-$size"
    PGVAULT_REPO=$repo "$PGVAULT" init --encryption none --compression zstd:3 --fixed-chunk-size "$size" >/dev/null
    first=$(PGVAULT_REPO=$repo "$PGVAULT" snapshot create --path "$WORK/state0" --output json)
    entries=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["new_blobs"]+d["reused_blobs"])' "$first")
    for txns in $TXNS; do
        out=$(PGVAULT_REPO=$repo "$PGVAULT" snapshot create --path "$WORK/state-$txns" --output json)
        python3 - "$out" "$size" "$txns" "$entries" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
print(f"{sys.argv[2]:<10} {sys.argv[3]:<8} {d['new_bytes']:>14} {d['stored_bytes']:>14} {d['new_blobs']:>12} {sys.argv[4]:>12}")
PY
    done
done
