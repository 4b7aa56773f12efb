#!/usr/bin/env bash
# The weft demo on embedded defaults: the global control plane on the memory store, two zone
# control planes (east, west) joined to it over KDS with zone tokens, the example resources
# from deploy/examples applied on global, and the data plane: in mesh `payments` (mTLS,
# deny by default) a backend instance with its weft-dp sidecar in each zone and a frontend
# sidecar in east calling backend over mTLS; then a tour. Stops everything on Ctrl-C.
# (Cross-zone traffic comes in a later issue: east's frontend reaches east's backend.)
set -euo pipefail
cd "$(dirname "$0")/.."
base="${WEFT_DEMO_PORT:-5681}"
api=$base kds=$((base + 4)) east_api=$((base + 10)) west_api=$((base + 20))
east_dp=$((base + 11)) west_dp=$((base + 21))
echo "building weft-global, weft-zone, weft-dp, weftctl and the demo app..."
cargo build --quiet --bin weft-global --bin weft-zone --bin weft-dp --bin weftctl --bin demo-app
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
    kill -0 "$2" 2>/dev/null || { cat "$4" >&2; echo "$1 exited; are ports $base..$((base + 30)) free? (WEFT_DEMO_PORT=...)" >&2; exit 1; }
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

dp_port() { local v="${1}_dp"; echo "${!v}"; }
ctl apply -f deploy/examples
for zone in east west; do
  target/debug/weftctl generate zone-token --zone "$zone" --valid-for 24h >"$data/$zone.token" 2>/dev/null
  port_var="${zone}_api"
  target/debug/weft-zone run --zone "$zone" --global-address "127.0.0.1:$kds" \
    --zone-token-file "$data/$zone.token" --global-ca-file "$data/global/kds-ca.pem" \
    --api-address "127.0.0.1:${!port_var}" --data-dir "$data/$zone" \
    --dataplane-address "127.0.0.1:$(dp_port "$zone")" >"$data/$zone.log" 2>&1 &
  pids+=($!)
  wait_ready "weft-zone $zone" "${pids[-1]}" "${!port_var}" "$data/$zone.log"
done

# sidecar NAME SERVICE ZONE ADMIN_PORT DATAPLANE_YAML: a weft-dp with its own dataplane token,
# ready when its admin /ready answers.
sidecar() {
  local name=$1 service=$2 zone=$3 admin=$4
  printf '%s\n' "$5" >"$data/$name.yaml"
  target/debug/weftctl generate dataplane-token --mesh payments --name "$name" --service "$service" \
    --valid-for 24h >"$data/$name.token" 2>/dev/null
  target/debug/weft-dp run --zone-address "https://127.0.0.1:$(dp_port "$zone")" \
    --zone-ca-file "$data/$zone/dataplane-ca.pem" --dataplane-file "$data/$name.yaml" \
    --token-file "$data/$name.token" --admin-address "127.0.0.1:$admin" >"$data/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$admin/ready" >/dev/null 2>&1 && { echo "weft-dp $name ready (zone $zone, admin 127.0.0.1:$admin)"; return 0; }
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$data/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "weft-dp $name not ready; its log: $data/$name.log" >&2
  exit 1
}

# A backend instance in each zone (app on +2, sidecar inbound on +3, admin on +4), and a
# frontend sidecar in east whose outbound 127.0.0.1:$((base + 16)) leads to backend.
for zone in east west; do
  off=$([ "$zone" = east ] && echo 10 || echo 20)
  app=$((base + off + 2)) inbound=$((base + off + 3)) admin=$((base + off + 4))
  target/debug/demo-app "backend-$zone" "127.0.0.1:$app" >"$data/app-$zone.log" 2>&1 &
  pids+=($!)
  sidecar "backend-$zone" backend "$zone" "$admin" "type: Dataplane
name: backend-$zone
mesh: payments
spec:
  networking:
    address: 127.0.0.1
    inbound:
    - port: $inbound
      servicePort: $app
      protocol: http
      tags: {weft.io/service: backend, version: v1}"
done
front_out=$((base + 16))
sidecar frontend-east frontend east $((base + 15)) "type: Dataplane
name: frontend-east
mesh: payments
spec:
  networking:
    address: 127.0.0.1
    inbound:
    - port: $((base + 17))
      servicePort: $((base + 18))
      protocol: http
      tags: {weft.io/service: frontend}
    outbound:
    - port: $front_out
      tags: {weft.io/service: backend}"
echo
for _ in $(seq 1 50); do curl -fsS "http://127.0.0.1:$front_out/" >/dev/null 2>&1 && break; sleep 0.1; done
echo "\$ curl http://127.0.0.1:$front_out/   # frontend's outbound -> (mTLS) -> backend's sidecar"
curl -sS "http://127.0.0.1:$front_out/"
echo

ctl inspect zones
ctl inspect meshes
ctl get meshtimeouts
ctl get dataplanes --mesh payments
echo "\$ weftctl inspect dataplanes -A   # against zone east"
WEFTCTL_ADDRESS="http://127.0.0.1:$east_api" WEFTCTL_TOKEN="$(cat "$data/east/admin-token")" target/debug/weftctl inspect dataplanes -A
echo
echo "\$ weftctl get meshtimeouts   # against zone west: synced from global"
WEFTCTL_ADDRESS="http://127.0.0.1:$west_api" WEFTCTL_TOKEN="$(cat "$data/west/admin-token")" target/debug/weftctl get meshtimeouts
echo
cat <<MSG
weft is running (memory stores):
  global API:    $WEFTCTL_ADDRESS   (admin token: $data/global/admin-token)
  global KDS:    127.0.0.1:$kds    (CA: $data/global/kds-ca.pem)
  zone east API: http://127.0.0.1:$east_api   (admin token: $data/east/admin-token)
  zone west API: http://127.0.0.1:$west_api   (admin token: $data/west/admin-token)
  data plane:    curl http://127.0.0.1:$front_out/   (frontend-east's outbound to backend, mTLS between sidecars)
                 curl http://127.0.0.1:$((base + 15))/config   (what frontend-east received; /ready, /metrics)
                 a MeshTrafficPermission denying it:  sed 's/Allow/Deny/' deploy/examples/payments-permissions.yaml | target/debug/weftctl apply -f -
  logs:          $data/*.log
  try:           export WEFTCTL_ADDRESS=$WEFTCTL_ADDRESS WEFTCTL_TOKEN=\$(cat $data/global/admin-token)
                 target/debug/weftctl apply -f deploy/examples/policies.yaml; target/debug/weftctl inspect zones
  metrics:       curl http://127.0.0.1:$api/metrics   curl http://127.0.0.1:$east_api/metrics | grep -E 'weft_(kds|dataplane)'
                 curl http://127.0.0.1:$((base + 15))/metrics   (the frontend sidecar)
Ctrl-C stops it.
MSG
wait "${pids[0]}"
