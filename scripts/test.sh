#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and end-to-end tests against real
# components (local filesystem, a moto S3 server and Azurite on 127.0.0.1, tmpfs for
# full-disk tests).
# Under CI=true a missing service fails the run instead of skipping tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
ensure_apt_packages
ensure_rust
ensure_moto
ensure_azurite
ensure_fake_gcs
ensure_pg_versions

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (target dir $CARGO_TARGET_DIR)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked
echo "==> all tests passed"
