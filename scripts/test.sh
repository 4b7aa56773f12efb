#!/usr/bin/env bash
# Run every test: installs and starts PostgreSQL from Debian's packages if needed (tests
# create their own databases on it), then the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export WEFT_TEST_POSTGRES_URL="${WEFT_TEST_POSTGRES_URL:-$(bash .ci/postgres.sh)}"
echo "tests use PostgreSQL at ${WEFT_TEST_POSTGRES_URL}"
cargo test --workspace --locked "$@"
