#!/usr/bin/env bash
# Commands on a repository in object storage that holds many snapshots: SNAPSHOTS (default
# 3000) small file snapshots are made in a local repository and uploaded as they are
# into a bucket of a loopback moto S3 server; then `snapshot list` (reads every snapshot)
# and `snapshot create` (reads every snapshot and index object) run there without the
# local object cache, with it empty (that run fills it) and filled. moto answers in
# about a millisecond; a real object store's round trips are tens of milliseconds, so
# the uncached runs are the better case of what a remote repository costs.
#
#   bash bench/many-snapshots.sh        SNAPSHOTS=3000 REPEAT=3
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SNAPSHOTS=${SNAPSHOTS:-3000}
REPEAT=${REPEAT:-3}
start_moto bench

echo "bench passphrase" > "$WORK/passphrase"
export PGVAULT_PASSPHRASE_FILE="$WORK/passphrase" PGVAULT_KEY_CACHE="$WORK/keys"
mkdir -p "$WORK/data"
"$PGVAULT" --repo "$WORK/repo" init >/dev/null 2>&1
echo "==> making $SNAPSHOTS snapshots in a local repository" >&2
for i in $(seq "$SNAPSHOTS"); do
    echo "$i" > "$WORK/data/file"
    "$PGVAULT" --repo "$WORK/repo" -q snapshot create --path "$WORK/data" >/dev/null
done
echo "==> uploading it into the S3 bucket" >&2
python3 - "$WORK/repo" <<'PY'
import os, sys
from concurrent.futures import ThreadPoolExecutor
import boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
root = sys.argv[1]
files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
def put(path):
    with open(path, "rb") as f:
        s3.put_object(Bucket="bench", Key="many/" + os.path.relpath(path, root), Body=f.read())
with ThreadPoolExecutor(8) as pool:
    list(pool.map(put, files))
PY

run() { # NAME CACHE COMMAND...
    local name=$1 cache=$2
    shift 2
    PGVAULT_OBJECT_CACHE=$cache measure "$name" "$PGVAULT" --repo s3://bench/many -q "$@"
}
for i in $(seq "$REPEAT"); do
    run "list-off" off snapshot list
    rm -rf "$WORK/objects"
    run "list-empty" "$WORK/objects" snapshot list
    run "list-filled" "$WORK/objects" snapshot list
    # The index objects are read by writers only: one unmeasured writer copies them.
    PGVAULT_OBJECT_CACHE="$WORK/objects" "$PGVAULT" --repo s3://bench/many -q snapshot create --path "$WORK/data" >/dev/null
    run "create-off" off snapshot create --path "$WORK/data"
    run "create-filled" "$WORK/objects" snapshot create --path "$WORK/data"
done

header "$SNAPSHOTS snapshots in a loopback S3 bucket (moto): wall s / CPU s / RSS MiB, median of $REPEAT"
echo "| command | no object cache | empty cache | filled cache |"
echo "|---|---:|---:|---:|"
row() { echo "$(field "$1" 1) / $(field "$1" 2) / $(field "$1" 3)"; }
echo "| snapshot list | $(row list-off) | $(row list-empty) | $(row list-filled) |"
echo "| snapshot create | $(row create-off) | — | $(row create-filled) |"
echo "object cache: $(du -sh "$WORK/objects" | cut -f1) for $(find "$WORK/objects" -type f | wc -l) objects"
