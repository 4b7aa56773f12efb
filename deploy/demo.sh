#!/usr/bin/env bash
# The weft demo on embedded defaults: the global control plane on the memory store, two zone
# control planes (east, west) joined to it over KDS with zone tokens, the example resources
# from deploy/examples applied on global, a dataplane registered in each zone, then a tour.
# Stops everything on Ctrl-C. (The data plane and cross-zone traffic come in later issues.)
set -euo pipefail
cd "$(dirname "$0")/.."
base="${WEFT_DEMO_PORT:-5681}"
api=$base kds=$((base + 4)) east_api=$((base + 10)) west_api=$((base + 20))
echo "building weft-global, weft-zone and weftctl..."
cargo build --quiet -p weft-global -p weft-zone -p weftctl
data="$(mktemp -d -t weft-demo.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$data"
  echo "demo stopped"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

# wait_ready NAME PID PORT LOG: until /readyz answers (and the admin token exists).
wait_ready() {
  for _ in $(seq 1 150); do
    curl -fsS "http://127.0.0.1:$3/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { cat "$4" >&2; echo "$1 exited; are ports $base..$((base + 20)) free? (WEFT_DEMO_PORT=...)" >&2; exit 1; }
    sleep 0.1
  done
  echo "$1 did not become ready; its log: $4" >&2
  exit 1
}

target/debug/weft-global run --store memory --data-dir "$data/global" \
  --api-address "127.0.0.1:$api" --kds-address "127.0.0.1:$kds" >"$data/global.log" 2>&1 &
pids+=($!)
wait_ready weft-global "${pids[0]}" "$api" "$data/global.log"
export WEFTCTL_ADDRESS="http://127.0.0.1:$api" WEFTCTL_TOKEN="$(cat "$data/global/admin-token")"
ctl() { echo "\$ weftctl $*"; target/debug/weftctl "$@"; echo; }

ctl apply -f deploy/examples
for zone in east west; do
  target/debug/weftctl generate zone-token --zone "$zone" --valid-for 24h >"$data/$zone.token" 2>/dev/null
  port_var="${zone}_api"
  target/debug/weft-zone run --zone "$zone" --global-address "127.0.0.1:$kds" \
    --zone-token-file "$data/$zone.token" --global-ca-file "$data/global/kds-ca.pem" \
    --api-address "127.0.0.1:${!port_var}" --data-dir "$data/$zone" >"$data/$zone.log" 2>&1 &
  pids+=($!)
  wait_ready "weft-zone $zone" "${pids[-1]}" "${!port_var}" "$data/$zone.log"
done

# Each zone registers a dataplane for its own backend instance; it flows up to global.
for zone in east west; do
  port_var="${zone}_api"
  sed -e "s/name: backend-1/name: backend-$zone/" -e "s/weft.io\/zone: east/weft.io\/zone: $zone/" \
    core/tests/fixtures/dataplane.yaml >"$data/dp-$zone.yaml"
  for _ in $(seq 1 50); do
    WEFTCTL_ADDRESS="http://127.0.0.1:${!port_var}" WEFTCTL_TOKEN="$(cat "$data/$zone/admin-token")" \
      target/debug/weftctl get mesh default >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "\$ weftctl apply -f dp-$zone.yaml   # against zone $zone"
  WEFTCTL_ADDRESS="http://127.0.0.1:${!port_var}" WEFTCTL_TOKEN="$(cat "$data/$zone/admin-token")" \
    target/debug/weftctl apply -f "$data/dp-$zone.yaml"
  echo
done
sleep 1

ctl inspect zones
ctl inspect meshes
ctl get meshtimeouts
ctl get dataplanes
echo "\$ weftctl get meshtimeouts   # against zone west: synced from global"
WEFTCTL_ADDRESS="http://127.0.0.1:$west_api" WEFTCTL_TOKEN="$(cat "$data/west/admin-token")" target/debug/weftctl get meshtimeouts
echo
cat <<MSG
weft is running (memory stores):
  global API:    $WEFTCTL_ADDRESS   (admin token: $data/global/admin-token)
  global KDS:    127.0.0.1:$kds    (CA: $data/global/kds-ca.pem)
  zone east API: http://127.0.0.1:$east_api   (admin token: $data/east/admin-token)
  zone west API: http://127.0.0.1:$west_api   (admin token: $data/west/admin-token)
  logs:          $data/*.log
  try:           export WEFTCTL_ADDRESS=$WEFTCTL_ADDRESS WEFTCTL_TOKEN=\$(cat $data/global/admin-token)
                 target/debug/weftctl apply -f deploy/examples/policies.yaml; target/debug/weftctl inspect zones
  metrics:       curl http://127.0.0.1:$api/metrics   curl http://127.0.0.1:$east_api/metrics | grep weft_kds
Ctrl-C stops it.
MSG
wait "${pids[0]}"
