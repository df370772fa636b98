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
    command -v lz4 >/dev/null || missing+=(lz4)
    [ -x /usr/bin/time ] || missing+=(time)
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
