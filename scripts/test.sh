#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests (model, crash
# harness, tamper, space, CLI, fuzz smoke), formatting and lints.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet
