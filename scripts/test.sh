#!/usr/bin/env bash
# Run every test: installs and starts PostgreSQL (and dig, iptables) from Debian's packages if needed
# (tests create their own databases on it), then the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# The cross-zone tests resolve mesh names with a real DNS client (dig).
if ! command -v dig >/dev/null; then
  echo "installing dig (bind9-dnsutils) from Debian's packages..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq bind9-dnsutils >&2 || { apt-get update -qq >&2 && apt-get install -y -qq bind9-dnsutils >&2; }
fi
# The transparent-mode tests apply iptables rules in a network namespace they create (as root).
if ! command -v iptables >/dev/null; then
  echo "installing iptables from Debian's packages..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq iptables >&2 || { apt-get update -qq >&2 && apt-get install -y -qq iptables >&2; }
fi
export WEFT_TEST_POSTGRES_URL="${WEFT_TEST_POSTGRES_URL:-$(bash .ci/postgres.sh)}"
echo "tests use PostgreSQL at ${WEFT_TEST_POSTGRES_URL}"
cargo test --workspace --locked "$@"
