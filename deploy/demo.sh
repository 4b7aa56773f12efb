#!/usr/bin/env bash
# The weft demo on embedded defaults: the global control plane on the memory store, two zone
# control planes (east, west) joined to it over KDS with zone tokens, a zone ingress per zone,
# the example resources from deploy/examples applied on global, and the data plane: in mesh
# `payments` (mTLS, deny by default) a backend instance with its weft-dp sidecar in each zone
# and a frontend sidecar in east that serves DNS for `*.mesh` and listens on the VIPs:
# `backend.mesh` (east's backend first, west's on failover) and `backend.west.mesh` (west's
# backend, through west's ingress, mTLS end to end); plus a zone egress in east through which
# the frontend reaches an external service (`payment-gateway.mesh`, a MeshExternalService).
# Then a tour. Stops everything on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${WEFT_DEMO_PORT:-5681}"
api=$base kds=$((base + 4)) east_api=$((base + 10)) west_api=$((base + 20))
east_dp=$((base + 11)) west_dp=$((base + 21))
east_ingress=$((base + 30)) west_ingress=$((base + 32)) dns=$((base + 34))
external_port=$((base + 36)) external_host=$((base + 37)) egress=$((base + 38))
backend_port=$((base + 3))
echo "building weft-global, weft-zone, weft-dp, weft-ingress, weftctl and the demo app..."
cargo build --quiet --bin weft-global --bin weft-zone --bin weft-dp --bin weft-ingress --bin weftctl --bin demo-app
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
    kill -0 "$2" 2>/dev/null || { cat "$4" >&2; echo "$1 exited; are ports $base..$((base + 39)) free? (WEFT_DEMO_PORT=...)" >&2; exit 1; }
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

# wait_admin NAME PID ADMIN_PORT LOG: until the admin /ready answers.
wait_admin() {
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$3/ready" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { cat "$4" >&2; exit 1; }
    sleep 0.1
  done
  echo "$1 not ready; its log: $4" >&2
  exit 1
}

# A zone ingress per zone (port, admin on +1), with an ingress-scoped zone token: other zones'
# sidecars reach this zone's services through it, TLS passed through by SNI.
for zone in east west; do
  port_var="${zone}_ingress"
  target/debug/weftctl generate zone-token --zone "$zone" --scope ingress --valid-for 24h \
    >"$data/$zone-ingress.token" 2>/dev/null
  target/debug/weft-ingress run --mode ingress --name ingress \
    --zone-address "https://127.0.0.1:$(dp_port "$zone")" --zone-ca-file "$data/$zone/dataplane-ca.pem" \
    --token-file "$data/$zone-ingress.token" --address "127.0.0.1:${!port_var}" \
    --admin-address "127.0.0.1:$((${!port_var} + 1))" >"$data/$zone-ingress.log" 2>&1 &
  pids+=($!)
  wait_admin "weft-ingress $zone" "${pids[-1]}" "$((${!port_var} + 1))" "$data/$zone-ingress.log"
  echo "weft-ingress of zone $zone ready on 127.0.0.1:${!port_var}"
done

# An external service (a demo app standing in for a payment provider outside the mesh),
# declared as a MeshExternalService that only frontend may use, and a zone egress in east
# (admin on +1) through which proxies reach it.
target/debug/demo-app payment-gateway "127.0.0.1:$external_host" >"$data/app-external.log" 2>&1 &
pids+=($!)
target/debug/weftctl apply -f - >/dev/null <<YAML
type: MeshExternalService
name: payment-gateway
mesh: payments
spec:
  match: {type: HostnameGenerator, port: $external_port, protocol: http}
  endpoints: [{address: 127.0.0.1, port: $external_host}]
---
type: MeshTrafficPermission
name: frontend-to-payment-gateway
mesh: payments
spec:
  targetRef: {kind: MeshExternalService, name: payment-gateway}
  from:
    - targetRef: {kind: MeshService, name: frontend}
      default: {action: Allow}
YAML
target/debug/weftctl generate zone-token --zone east --scope egress --valid-for 24h \
  >"$data/east-egress.token" 2>/dev/null
target/debug/weft-ingress run --mode egress --name egress \
  --zone-address "https://127.0.0.1:$east_dp" --zone-ca-file "$data/east/dataplane-ca.pem" \
  --token-file "$data/east-egress.token" --address "127.0.0.1:$egress" \
  --admin-address "127.0.0.1:$((egress + 1))" >"$data/east-egress.log" 2>&1 &
pids+=($!)
wait_admin "weft-ingress --mode egress (east)" "${pids[-1]}" "$((egress + 1))" "$data/east-egress.log"
echo "zone egress of east ready on 127.0.0.1:$egress"

# sidecar NAME SERVICE ZONE ADMIN_PORT DATAPLANE_YAML [WEFT-DP FLAGS...]: a weft-dp with its
# own dataplane token, ready when its admin /ready answers.
sidecar() {
  local name=$1 service=$2 zone=$3 admin=$4
  printf '%s\n' "$5" >"$data/$name.yaml"
  target/debug/weftctl generate dataplane-token --mesh payments --name "$name" --service "$service" \
    --valid-for 24h >"$data/$name.token" 2>/dev/null
  target/debug/weft-dp run --zone-address "https://127.0.0.1:$(dp_port "$zone")" \
    --zone-ca-file "$data/$zone/dataplane-ca.pem" --dataplane-file "$data/$name.yaml" \
    --token-file "$data/$name.token" --admin-address "127.0.0.1:$admin" "${@:6}" >"$data/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$admin/ready" >/dev/null 2>&1 && { echo "weft-dp $name ready (zone $zone, admin 127.0.0.1:$admin)"; return 0; }
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$data/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "weft-dp $name not ready; its log: $data/$name.log" >&2
  exit 1
}

# A backend instance in each zone (app on +2, admin on +4; the sidecar's inbound on
# $backend_port of its own loopback address: 127.0.0.2 in east, 127.0.0.3 in west, so the
# service has one port whichever zone serves it), and a frontend sidecar in east with an
# outbound 127.0.0.1:$((base + 16)) to backend, DNS on 127.0.0.1:$dns and the VIP listeners.
for zone in east west; do
  off=$([ "$zone" = east ] && echo 10 || echo 20)
  ip=$([ "$zone" = east ] && echo 127.0.0.2 || echo 127.0.0.3)
  app=$((base + off + 2)) admin=$((base + off + 4))
  target/debug/demo-app "backend-$zone" "127.0.0.1:$app" >"$data/app-$zone.log" 2>&1 &
  pids+=($!)
  sidecar "backend-$zone" backend "$zone" "$admin" "type: Dataplane
name: backend-$zone
mesh: payments
spec:
  networking:
    address: $ip
    inbound:
    - port: $backend_port
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
      tags: {weft.io/service: backend}" --dns-address "127.0.0.1:$dns" --bind-vips
echo
for _ in $(seq 1 50); do curl -fsS "http://127.0.0.1:$front_out/" >/dev/null 2>&1 && break; sleep 0.1; done
echo "\$ curl http://127.0.0.1:$front_out/   # frontend's outbound -> (mTLS) -> backend's sidecar"
curl -sS "http://127.0.0.1:$front_out/"
echo
zone_ctl() { local v="${1}_api"; WEFTCTL_ADDRESS="http://127.0.0.1:${!v}" WEFTCTL_TOKEN="$(cat "$data/$1/admin-token")" target/debug/weftctl "${@:2}"; }
# vip NAME: the VIP frontend-east's DNS gives NAME (waits for west's backend to be known).
vip() {
  local v=""
  for _ in $(seq 1 100); do
    if command -v dig >/dev/null; then
      v=$(dig +short +tries=1 +time=1 @127.0.0.1 -p "$dns" "$1" A 2>/dev/null | head -n1)
    else
      v=$(curl -fsS "http://127.0.0.1:$((base + 15))/config" 2>/dev/null |
        python3 -c "import json,sys; c=json.load(sys.stdin); print(next((v['address'] for v in c.get('vips',[]) if v.get('name')=='$1'),''))" 2>/dev/null || true)
    fi
    [ -n "$v" ] && { echo "$v"; return 0; }
    sleep 0.2
  done
  echo "no VIP for $1 yet (see $data/east.log)" >&2
  return 1
}
vip_any=$(vip backend.mesh) vip_west=$(vip backend.west.mesh)
if command -v dig >/dev/null; then
  echo "\$ dig +short @127.0.0.1 -p $dns backend.west.mesh   # frontend-east's DNS"
  dig +short @127.0.0.1 -p "$dns" backend.west.mesh
  echo
fi
for _ in $(seq 1 50); do curl -fsS "http://$vip_west:$backend_port/" >/dev/null 2>&1 && break; sleep 0.2; done
echo "\$ curl http://backend.west.mesh:$backend_port/   # = http://$vip_west:$backend_port/: east's frontend -> west's ingress -> west's backend, mTLS end to end"
curl -sS "http://$vip_west:$backend_port/"
echo
echo "\$ curl http://backend.mesh:$backend_port/   # = http://$vip_any:$backend_port/: east's own backend first"
curl -sS "http://$vip_any:$backend_port/"
echo
vip_ext=$(vip payment-gateway.mesh)
for _ in $(seq 1 50); do curl -fsS "http://$vip_ext:$external_port/" >/dev/null 2>&1 && break; sleep 0.2; done
echo "\$ curl http://payment-gateway.mesh:$external_port/   # = http://$vip_ext:$external_port/: frontend -> (mTLS) east's egress -> the external host"
curl -sS "http://$vip_ext:$external_port/"
echo
echo "\$ weftctl inspect services --mesh payments   # against zone east: its VIPs"
zone_ctl east inspect services --mesh payments
echo

ctl inspect zones
ctl inspect meshes
ctl inspect services -A
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
  ingresses:     east 127.0.0.1:$east_ingress, west 127.0.0.1:$west_ingress   (metrics: curl http://127.0.0.1:$((west_ingress + 1))/metrics)
  DNS:           dig @127.0.0.1 -p $dns backend.mesh | backend.east.mesh | backend.west.mesh   (frontend-east's weft-dp)
  cross-zone:    curl http://$vip_west:$backend_port/   (backend.west.mesh: through west's ingress)
                 curl http://$vip_any:$backend_port/   (backend.mesh: east first; kill backend-east's sidecar and it fails over to west)
  egress:        curl http://$vip_ext:$external_port/   (payment-gateway.mesh: through east's egress; metrics: curl http://127.0.0.1:$((egress + 1))/metrics)
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
