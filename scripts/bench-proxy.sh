#!/usr/bin/env bash
# The proxy benchmark of issues 4 and 5 (docs/benchmarks.md): D0 direct, the weft-dp pair (D2),
# the HAProxy pair, a tokio-rustls tunnel pair (the floor), and D3 (weft-dp -> zone ingress ->
# weft-dp, with weft-ingress and with HAProxy as the ingress), alternating, on loopback.
#
# Usage: scripts/bench-proxy.sh [bench-proxy flags]
#   full run (5 runs x 10 s per chain and load, ~20 min): scripts/bench-proxy.sh
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

# Only what the benchmark runs: itself, the proxies and the control plane that configures them,
# in release; weft-dp also as shipped, with the size-optimised `sidecar` profile (Cargo.toml),
# which is the one D2, D3 and the idle check run.
PKGS=(-p weft-bench -p weft-dp -p weft-ingress -p weft-global -p weft-zone)
echo "== cargo build --release ${PKGS[*]}" >&2
if ! cargo build --release "${PKGS[@]}"; then
    # The weft chains need weft-dp (D2, D3) and weft-ingress (D3); the others do not. Build
    # what can be built and let the report say which chain did not run and why.
    echo "== the build failed; building the benchmark and the control plane only" >&2
    cargo build --release -p weft-bench -p weft-global -p weft-zone
fi
echo "== cargo build --profile sidecar -p weft-dp" >&2
cargo build --profile sidecar -p weft-dp || echo "== the sidecar build failed; the weft chains will say so" >&2

exec target/release/bench-proxy \
    --oha "$(command -v oha)" \
    --haproxy "$(command -v haproxy)" \
    --weft-dp target/sidecar/weft-dp \
    --json target/bench-proxy.json \
    "$@"
