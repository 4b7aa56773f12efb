#!/usr/bin/env bash
# The weft demo on embedded defaults: the global control plane on the memory store, the
# example resources from deploy/examples applied with weftctl, then a short tour.
# Stops everything on Ctrl-C. (Later issues grow this into the multi-zone demo.)
set -euo pipefail
cd "$(dirname "$0")/.."
port="${WEFT_DEMO_PORT:-5681}"
echo "building weft-global and weftctl..."
cargo build --quiet -p weft-global -p weftctl
data="$(mktemp -d -t weft-demo.XXXXXX)"
log="${WEFT_DEMO_LOG:-$data/global.log}"
target/debug/weft-global run --store memory --data-dir "$data" --api-address "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"; echo "demo stopped"; }
trap cleanup EXIT
trap 'exit 0' INT TERM
for _ in $(seq 1 100); do
  [ -s "$data/admin-token" ] && curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "weft-global exited; is port $port free? (WEFT_DEMO_PORT=...)" >&2; exit 1; }
  sleep 0.1
done
export WEFTCTL_ADDRESS="http://127.0.0.1:$port" WEFTCTL_TOKEN="$(cat "$data/admin-token")"
ctl() { echo "\$ weftctl $*"; target/debug/weftctl "$@"; echo; }
ctl apply -f deploy/examples
ctl inspect meshes
ctl get meshes
ctl get meshtimeouts
ctl get zones
cat <<MSG
weft-global is running at $WEFTCTL_ADDRESS (memory store).
  admin token:   $data/admin-token
  its log:       $log
  try:           export WEFTCTL_ADDRESS=$WEFTCTL_ADDRESS WEFTCTL_TOKEN=\$(cat $data/admin-token)
                 target/debug/weftctl get meshtimeouts -o yaml
  metrics:       curl http://127.0.0.1:$port/metrics
  API document:  curl http://127.0.0.1:$port/openapi.json
Ctrl-C stops it.
MSG
wait "$pid"
