#!/usr/bin/env bash
# The proxy benchmark of issue 4 (docs/benchmarks.md): D0 direct, the weft-dp pair (D2),
# the HAProxy pair and a tokio-rustls tunnel pair (the floor), alternating, on loopback.
#
# Usage: scripts/bench-proxy.sh [bench-proxy flags]
#   full run (5 runs x 10 s per chain and load, ~15 min): scripts/bench-proxy.sh
#   quick look:                                           scripts/bench-proxy.sh --runs 1 --duration 2s
# Installs what is missing: haproxy (Debian's package) and oha (crates.io, `cargo install
# --locked`, about 4 minutes on 2 cores). Prints the table; samples go to target/bench-proxy.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/usr/sbin:/sbin:$PATH"

if ! command -v haproxy >/dev/null; then
    echo "== installing haproxy (Debian package)" >&2
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy \
        || { $SUDO apt-get update && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy; }
fi
if ! command -v oha >/dev/null; then
    echo "== installing oha (cargo install --locked oha)" >&2
    cargo install --locked oha
fi
echo "== $(haproxy -v | head -1)" >&2
echo "== $(oha --version)" >&2

echo "== cargo build --release --bins" >&2
if ! cargo build --release --bins; then
    # The weft chain needs weft-dp; the others do not. Build what can be built and let the
    # report say which chain did not run and why.
    echo "== the workspace did not build; building the benchmark and the control plane only" >&2
    cargo build --release -p weft-bench -p weft-global -p weft-zone
fi

exec target/release/bench-proxy \
    --oha "$(command -v oha)" \
    --haproxy "$(command -v haproxy)" \
    --json target/bench-proxy.json \
    "$@"
