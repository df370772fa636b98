# Shared by the bench scripts: build pgvault (release), throwaway PostgreSQL servers
# bound to 127.0.0.1, timing with CPU seconds and peak RSS. Source it from a script
# that has done `cd` to the repository root.
set -euo pipefail
source scripts/ensure-deps.sh
ensure_apt_packages
ensure_rust
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
echo "==> building pgvault (release)" >&2
cargo build --quiet --release --locked -p pgvault
PGVAULT="$CARGO_TARGET_DIR/release/pgvault"

WORK=$(mktemp -d /var/tmp/pgvault-bench.XXXXXX)
chmod 755 "$WORK"
if [ "$(id -u)" -eq 0 ]; then
    AS_PG="runuser -u postgres --"
    chown postgres "$WORK"
else
    AS_PG=""
fi
as_pg() { $AS_PG "$@"; }
mkdir -p "$WORK/bin"
# $WORK/bin/synced DIR CMD...: runs CMD, then syncs DIR's filesystem, so that a restore is
# timed until its files are on disk.
printf '#!/usr/bin/env bash\ndir=$1; shift; "$@" && exec sync -f "$dir"\n' > "$WORK/bin/synced"
chmod 755 "$WORK/bin/synced"
# wrapper NAME CMD...: an executable $WORK/bin/NAME running CMD (as postgres) with its
# arguments, so that `measure` (which runs programs, not shell functions) can time it.
wrapper() {
    local name=$1
    shift
    printf '#!/usr/bin/env bash
exec %s %s "$@"
' "$AS_PG" "$(printf '%q ' "$@")" > "$WORK/bin/$name"
    chmod 755 "$WORK/bin/$name"
    echo "$WORK/bin/$name"
}
SERVERS=()
# Free page reporting (virtio-balloon, e.g. on Firecracker VMs): what the kernel frees, all
# of the page cache at every drop_caches, is handed back to the host within seconds, and
# the next step that fills the page cache pays about 2 s of system time per GiB to get it
# back. That charges each tool by how much page cache it fills and by when it runs (here a
# pgBackRest restore took 2.7-2.9 s with it and 2.0 s without; pgvault, which writes with
# direct I/O, 1.2 s either way), so it is paused for the run and restored at exit.
PAGE_REPORTING=/sys/module/page_reporting/parameters/page_reporting_order
saved_reporting_order=
pause_page_reporting() {
    [ -w "$PAGE_REPORTING" ] || return 0
    local order
    order=$(cat "$PAGE_REPORTING")
    # Above the largest buddy order, no free block qualifies for reporting.
    if ! echo 11 2>/dev/null > "$PAGE_REPORTING"; then
        echo "warning: free page reporting to the host could not be paused; times of steps that fill the page cache will vary" >&2
        return 0
    fi
    saved_reporting_order=$order
    # Memory the host already took back is faulted in once here, not during a step: up to
    # 8 GiB, at most half of what is available.
    local gib
    gib=$(awk '/^MemAvailable:/ { g = int($2 / 2 / 1048576); print (g > 8 ? 8 : g) }' /proc/meminfo)
    echo "==> free page reporting to the host paused for the run (order $order restored at exit); faulting $gib GiB back in" >&2
    python3 -c "b = b'\x01' * ($gib << 30)"
}
bench_cleanup() {
    if [ -n "${MOTO_PID:-}" ]; then kill "$MOTO_PID" 2>/dev/null || true; fi
    if [ -n "$saved_reporting_order" ]; then
        echo "$saved_reporting_order" > "$PAGE_REPORTING" || true
    fi
    for dir in "${SERVERS[@]}"; do
        as_pg "$PG_BIN/pg_ctl" -D "$dir" -m immediate stop >/dev/null 2>&1 || true
    done
    # Async archivers may still be finishing a segment after their server stopped.
    pkill -f "archive-push-worker.*$WORK" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK" 2>/dev/null || { sleep 2; rm -rf "$WORK"; }
    fi
}
trap bench_cleanup EXIT
pause_page_reporting

# Writes back and drops the page cache (root only), so the next step reads from disk.
drop_caches() {
    sync
    echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "warning: cannot drop the page cache (not root)" >&2
}

# wait_archived PORT: until the archiver has no segment left to push, so that the step
# measured next does not share the CPUs with archive_command catching up (after a data
# load, dozens of segments).
wait_archived() {
    local port=$1 ready said=
    for _ in $(seq 1500); do
        ready=$(sql "$port" "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'")
        [ "$ready" = 0 ] && return 0
        [ -n "${said:-}" ] || { echo "==> waiting for the archiver ($ready segments to push)" >&2; said=1; }
        sleep 0.2
    done
    echo "the archiver still has $ready segments to push after 300 s; see the server log" >&2
    return 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_moto BUCKET: a moto S3 server on a free loopback port (MOTO_PORT; stopped at
# exit) holding BUCKET, with AWS_ENDPOINT_URL and credentials exported for it.
start_moto() {
    ensure_moto
    MOTO_PORT=$(free_port)
    python3 -c 'import sys; from moto.server import main; main(["-H", "127.0.0.1", "-p", sys.argv[1]])' "$MOTO_PORT" \
        > "$WORK/moto.log" 2>&1 &
    MOTO_PID=$!
    export AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
    for _ in $(seq 100); do
        curl -s -o /dev/null -X PUT "$AWS_ENDPOINT_URL/$1" && return 0
        sleep 0.2
    done
    echo "the moto S3 server did not start; see $WORK/moto.log" >&2
    return 1
}

# new_server DIR PORT [postgresql.conf lines...]: initdb with checksums and start.
new_server() {
    local dir=$1 port=$2
    shift 2
    as_pg "$PG_BIN/initdb" --data-checksums -A trust -U postgres -D "$dir" >/dev/null
    {
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$WORK'"
        echo "max_wal_size = '4GB'"
        for line in "$@"; do echo "$line"; done
    } | as_pg tee -a "$dir/postgresql.conf" >/dev/null
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir.log" -w start >/dev/null
    SERVERS+=("$dir")
}
stop_server() { as_pg "$PG_BIN/pg_ctl" -D "$1" -m fast -w stop >/dev/null; }
sql() { as_pg "$PG_BIN/psql" -X -q -A -t -h 127.0.0.1 -p "$1" -U postgres -d "${3:-postgres}" -c "$2"; }

# pgbackrest_stanza PGDATA PORT LEVEL: $WORK/pgbackrest.conf for stanza "bench" of the
# server at PGDATA/PORT (zstd at LEVEL, process-max 2, repository bundling; repository,
# log, lock and spool under $WORK/pgbr); prints a wrapper running pgbackrest with it.
pgbackrest_stanza() {
    local pgdata=$1 port=$2 level=$3
    as_pg mkdir -p "$WORK/pgbr/repo" "$WORK/pgbr/log" "$WORK/pgbr/lock" "$WORK/pgbr/spool"
    as_pg tee "$WORK/pgbackrest.conf" >/dev/null <<CONF
[global]
repo1-path=$WORK/pgbr/repo
repo1-retention-full=10
repo1-bundle=y
compress-type=zst
compress-level=$level
process-max=2
log-path=$WORK/pgbr/log
lock-path=$WORK/pgbr/lock
spool-path=$WORK/pgbr/spool
log-level-console=warn
start-fast=y

[bench]
pg1-path=$pgdata
pg1-port=$port
pg1-socket-path=$WORK
CONF
    wrapper pgbr pgbackrest --config="$WORK/pgbackrest.conf" --stanza=bench
}

# measure NAME CMD...: runs CMD, appends "NAME wall_s cpu_s rss_mib" to $WORK/times.
measure() {
    local name=$1
    shift
    # The tools' own output goes to a log, shown when a step fails.
    if ! /usr/bin/time -f "%e %U %S %M" -o "$WORK/time.out" "$@" >> "$WORK/steps.log" 2>&1; then
        tail -20 "$WORK/steps.log" >&2
        echo "bench step $name failed: $*" >&2
        return 1
    fi
    read -r wall user sys rss < "$WORK/time.out"
    printf '%s %s %s %s\n' "$name" "$wall" "$(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }')" "$((rss / 1024))" >> "$WORK/times"
}
# field NAME COLUMN (1 wall, 2 cpu, 3 rss): the median over the runs of NAME (the lower
# middle one for an even count), as single runs on a shared VM move by 2x.
field() {
    awk -v n="$1" -v c="$2" '$1 == n { print $(c + 1) }' "$WORK/times" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
header() {
    echo "# $1"
    echo "# $(date -u +%FT%TZ), pgvault $(git rev-parse --short HEAD), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}')"
}
