#!/usr/bin/env bash
# Physical backup and restore, side by side on the same data in one run: pgvault,
# pgBackRest (zstd at LEVEL, default 3; process-max 2, repo bundling), pg_basebackup
# (tar, server-side zstd at LEVEL with 2 workers) and, as the Rust peer, rustic (a
# deduplicating, encrypting backup tool of files: zstd at LEVEL, extra verification
# off; it copies the data directory as files, with no backup API and no WAL wait, so its times are of the file work alone;
# RUSTIC=0 leaves it out). DATASET=pgbench: a pgbench database of SCALE (default 100,
# ~1.5 GiB; compresses ~20x) changed by `pgbench -c 4 -t TXNS`; DATASET=text: as many
# bytes of rows of random and repetitive text (compresses ~5x), changed by 4×TXNS
# single-row updates. A full backup, the change, a second backup (pgvault: every backup
# complete, unchanged files reused; pgBackRest: incremental; pg_basebackup: full again),
# a restore of the second backup, and for pgvault and pgBackRest a delta restore over
# that restore. Wall seconds, CPU seconds, peak RSS and repository bytes (backups only:
# pgvault's files/ and pgBackRest's archive/ hold the WAL both archive).
#
# Full backups, restores and delta restores are repeated REPEAT times (default 3); the
# table shows medians.
#
#   bash bench/backup-compare.sh        DATASET=pgbench|text SCALE=100 TXNS=1000 REPEAT=3 LEVEL=3 PGV_COMPRESSION=zstd:LEVEL RUSTIC=1
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SCALE=${SCALE:-100}
TXNS=${TXNS:-1000}
REPEAT=${REPEAT:-3}
# The comparison is at the same zstd LEVEL for every tool (LEVEL=1 compares the fastest
# level on both sides); PGV_COMPRESSION for pgvault alone shows what it trades (stored
# bytes against time).
LEVEL=${LEVEL:-3}
PGV_COMPRESSION=${PGV_COMPRESSION:-zstd:$LEVEL}
DATASET=${DATASET:-pgbench}
RUSTIC=${RUSTIC:-1}
if ! command -v pgbackrest >/dev/null; then
    echo "==> installing pgbackrest" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest >/dev/null
fi
RUSTIC_VERSION=0.11.4
PGVAULT_TOOLS=${PGVAULT_TOOLS:-/var/tmp/pgvault-tools}
rustic_bin="$PGVAULT_TOOLS/rustic-$RUSTIC_VERSION/bin/rustic"
if [ "$RUSTIC" = 1 ] && [ ! -x "$rustic_bin" ]; then
    echo "==> building rustic $RUSTIC_VERSION (once, into $PGVAULT_TOOLS; about 15 minutes on 2 CPUs)" >&2
    cargo install --quiet --locked rustic-rs --version "$RUSTIC_VERSION" --root "$PGVAULT_TOOLS/rustic-$RUSTIC_VERSION"
fi
port=$(free_port)
pgdata="$WORK/pgdata"
as_pg mkdir -p "$WORK/pgv-repo" "$WORK/basebackup"
# pgvault encrypts (its default, XChaCha20-Poly1305); pgBackRest and pg_basebackup do not.
as_pg bash -c "umask 077; echo bench-passphrase > $WORK/passphrase"
# pgvault on the benchmark's repository, for its set-up (not timed).
pgv_admin() { as_pg "$PGVAULT" --repo "$WORK/pgv-repo" --passphrase-file "$WORK/passphrase" "$@" >/dev/null; }
rustic_init() { "$rustic" init --set-compression "$LEVEL" --set-extra-verify false >/dev/null 2>&1; }
pgv_admin init --compression "$PGV_COMPRESSION"
pgv=$(wrapper pgv "$PGVAULT" --repo "$WORK/pgv-repo" --passphrase-file "$WORK/passphrase" --jobs 2 -q)
pgbr=$(pgbackrest_stanza "$pgdata" "$port" "$LEVEL")
basebackup=$(wrapper basebackup "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$port" -U postgres -Ft -X none --compress=server-zstd:level=$LEVEL,workers=2 --checkpoint=fast -D)
# Every restore is timed until its files are on disk: each restore step ends with a sync
# of the target's filesystem (pgvault fsyncs what it restores before it reports success,
# which makes that sync cheap; a tool that leaves the files in the page cache pays there).
untar=$(wrapper untar bash -c 'zstd -q -d -c "$0" | tar -x -C "$1" && sync -f "$1"')
if [ "$RUSTIC" = 1 ]; then
    as_pg mkdir -p "$WORK/rustic"
    rustic=$(wrapper rustic "$rustic_bin" -r "$WORK/rustic/repo" -p "$WORK/passphrase" --no-cache --no-progress --log-level warn)
    rustic_init
fi
# Both tools archive: pgvault's archive_command pushes to its repository, then pgBackRest's.
new_server "$pgdata" "$port" "archive_mode = on" "wal_level = replica" \
    "archive_command = '$PGVAULT --repo $WORK/pgv-repo --passphrase-file $WORK/passphrase --jobs 2 archive-push %p && pgbackrest --config=$WORK/pgbackrest.conf --stanza=bench archive-push %p'"
conninfo="host=127.0.0.1 port=$port user=postgres"
pgv_admin setup --pg-conn "$conninfo"
"$pgbr" stanza-create >/dev/null
# 100,000 rows per scale unit of ~150 bytes: 32 random hex digits and a repeated word.
TEXT_ROWS=$((SCALE * 100000))
text_row="md5(random()::text) || ' ' || repeat(substr(md5(g::text), 1, 8) || ' ', 10)"
case $DATASET in
    pgbench)
        echo "==> pgbench -i -s $SCALE" >&2
        as_pg "$PG_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1
        ;;
    text)
        echo "==> $TEXT_ROWS rows of text" >&2
        sql "$port" "CREATE TABLE texts (id int PRIMARY KEY, payload text) WITH (fillfactor = 90)" >/dev/null
        sql "$port" "INSERT INTO texts SELECT g, $text_row FROM generate_series(1, $TEXT_ROWS) g" >/dev/null
        ;;
    *) echo "DATASET must be pgbench or text" >&2; exit 2 ;;
esac
sql "$port" "CHECKPOINT" >/dev/null
wait_archived "$port"
size=$(du -sb --exclude=pg_wal "$pgdata" | cut -f1)


# Full backups run REPEAT times as well, the tools alternating; pgvault and rustic back up
# into a fresh repository each time (nothing deduplicated against the run before), the
# second backup builds on the last run's. The table shows the median time and the last
# run's bytes.
for run in $(seq "$REPEAT"); do
    if [ "$run" -gt 1 ]; then
        # No segment may be on its way into the repository that is replaced.
        wait_archived "$port"
        rm -rf "$WORK/pgv-repo"
        as_pg mkdir -p "$WORK/pgv-repo"
        pgv_admin init --compression "$PGV_COMPRESSION"
        pgv_admin setup --pg-conn "$conninfo"
        if [ "$RUSTIC" = 1 ]; then
            rm -rf "$WORK/rustic/repo"
            rustic_init
        fi
    fi
    measure pgvault-full "$pgv" backup --fast --pg-conn "$conninfo" --pgdata "$pgdata"
    pgv_full_bytes=$(du -sb --exclude=files "$WORK/pgv-repo" | cut -f1)
    measure pgbackrest-full "$pgbr" --type=full backup
    pgbr_full_bytes=$(du -sb "$(ls -d "$WORK"/pgbr/repo/backup/bench/*F | tail -1)" | cut -f1)
    measure basebackup-full "$basebackup" "$WORK/basebackup/1-$run"
    bb_full_bytes=$(du -sb "$WORK/basebackup/1-$run" | cut -f1)
    if [ "$RUSTIC" = 1 ]; then
        measure rustic-full "$rustic" backup "$pgdata" --glob "!$pgdata/pg_wal"
        rustic_full_bytes=$(du -sb "$WORK/rustic/repo" | cut -f1)
    fi
done

if [ "$DATASET" = pgbench ]; then
    echo "==> pgbench -c 4 -t $TXNS" >&2
    as_pg "$PG_BIN/pgbench" -n -c 4 -t "$TXNS" -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1
else
    echo "==> $((4 * TXNS)) single-row updates" >&2
    # Ids drawn here: random() in the WHERE clause would be evaluated per row (a scan).
    for _ in $(seq 1 $((4 * TXNS))); do
        echo "UPDATE texts SET payload = md5(random()::text) || substr(payload, 33) WHERE id = $(( (RANDOM * 32768 + RANDOM) % TEXT_ROWS + 1 ));"
    done | as_pg "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres >/dev/null
fi
wait_archived "$port"
measure pgvault-second "$pgv" backup --fast --pg-conn "$conninfo" --pgdata "$pgdata"
pgv_second_bytes=$(( $(du -sb --exclude=files "$WORK/pgv-repo" | cut -f1) - pgv_full_bytes ))
pgbr_before_second=$(du -sb "$WORK/pgbr/repo/backup" | cut -f1)
measure pgbackrest-incr "$pgbr" --type=incr backup
pgbr_second_bytes=$(( $(du -sb "$WORK/pgbr/repo/backup" | cut -f1) - pgbr_before_second ))
measure basebackup-second "$basebackup" "$WORK/basebackup/2"
bb_second_bytes=$(du -sb "$WORK/basebackup/2" | cut -f1)
if [ "$RUSTIC" = 1 ]; then
    measure rustic-second "$rustic" backup "$pgdata" --glob "!$pgdata/pg_wal"
    rustic_second_bytes=$(( $(du -sb "$WORK/rustic/repo" | cut -f1) - rustic_full_bytes ))
fi

# Restores and delta restores run REPEAT times, the two tools alternating, and the
# tables show the median: one run of either on this VM can take twice as long as the next.
for _ in $(seq "$REPEAT"); do
    rm -rf "$WORK/r-pgv" "$WORK/r-pgbr"
    # From a repository that is not cached (a restore seldom follows its backup), and with
    # no dirty pages of the previous tool left to write back.
    drop_caches
    measure pgvault-restore "$WORK/bin/synced" "$WORK" "$pgv" restore --pgdata "$WORK/r-pgv" --target immediate
    drop_caches
    measure pgbackrest-restore "$WORK/bin/synced" "$WORK" "$pgbr" --pg1-path="$WORK/r-pgbr" --type=immediate restore
    if [ "$RUSTIC" = 1 ]; then
        rm -rf "$WORK/r-rustic"
        drop_caches
        measure rustic-restore "$WORK/bin/synced" "$WORK" "$rustic" restore latest "$WORK/r-rustic"
    fi
done
as_pg mkdir -p "$WORK/r-bb"
drop_caches
measure basebackup-restore "$untar" "$WORK/basebackup/2/base.tar.zst" "$WORK/r-bb"
# Delta restores over the restored copies (here: of the same backup, so nearly nothing
# differs; the cost is reading and hashing every file). The page cache is dropped first:
# a data directory being repaired is not still cached from its restore, and a tool that
# restores with direct I/O would otherwise be measured against one whose copy is cached.
for _ in $(seq "$REPEAT"); do
    drop_caches
    measure pgvault-delta "$WORK/bin/synced" "$WORK" "$pgv" restore --pgdata "$WORK/r-pgv" --target immediate --delta
    drop_caches
    measure pgbackrest-delta "$WORK/bin/synced" "$WORK" "$pgbr" --pg1-path="$WORK/r-pgbr" --type=immediate --delta restore
    if [ "$RUSTIC" = 1 ]; then
        # Reading and checking every existing file, as the other two do (by default it
        # trusts size and modification time).
        drop_caches
        measure rustic-delta "$WORK/bin/synced" "$WORK" "$rustic" restore latest "$WORK/r-rustic" --verify-existing --delete
    fi
done

header "physical backup, $DATASET: scale $SCALE ($(numfmt --to=iec "$size") without WAL), $TXNS×4 transactions between backups; full backups and restores: median of $REPEAT; pgvault $PGV_COMPRESSION, pgBackRest $(pgbackrest version | awk '{print $2}') zstd:$LEVEL"
printf '%-22s %9s %9s %9s %12s\n' step seconds "CPU s" "RSS MiB" "repo bytes"
line() { printf '%-22s %9s %9s %9s %12s\n' "$1" "$(field "$1" 1)" "$(field "$1" 2)" "$(field "$1" 3)" "${2:-}"; }
line pgvault-full "$(numfmt --to=iec "$pgv_full_bytes")"
line pgbackrest-full "$(numfmt --to=iec "$pgbr_full_bytes")"
line basebackup-full "$(numfmt --to=iec "$bb_full_bytes")"
[ "$RUSTIC" = 1 ] && line rustic-full "$(numfmt --to=iec "$rustic_full_bytes")"
line pgvault-second "+$(numfmt --to=iec "$pgv_second_bytes")"
line pgbackrest-incr "+$(numfmt --to=iec "$pgbr_second_bytes")"
line basebackup-second "+$(numfmt --to=iec "$bb_second_bytes")"
[ "$RUSTIC" = 1 ] && line rustic-second "+$(numfmt --to=iec "$rustic_second_bytes")"
line pgvault-restore; line pgbackrest-restore; line basebackup-restore
[ "$RUSTIC" = 1 ] && line rustic-restore
line pgvault-delta; line pgbackrest-delta
[ "$RUSTIC" = 1 ] && line rustic-delta
# ratios_to TOOL SECOND_STEP: TOOL's time over pgvault's for each step.
ratios_to() {
    local tool=$1 second=$2
    for pair in "full:$tool-full" "second:$second" "restore:$tool-restore" "delta:$tool-delta"; do
        IFS=: read -r label step <<< "$pair"
        echo "  $label: $(ratio "$(field "$step" 1)" "$(field "pgvault-$label" 1)")"
    done
}
echo "time ratios (pgBackRest / pgvault; > 1 means pgvault is faster):"
ratios_to pgbackrest pgbackrest-incr
echo "  full vs pg_basebackup (basebackup / pgvault): $(ratio "$(field basebackup-full 1)" "$(field pgvault-full 1)")"
if [ "$RUSTIC" = 1 ]; then
    echo "time ratios (rustic / pgvault):"
    ratios_to rustic rustic-second
fi
