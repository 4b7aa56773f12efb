//! Policy resolution for one proxy (`policy::resolve`), end to end from YAML documents:
//! selection by the top-level targetRef, Kuma's order (specificity, origin, name), field by
//! field merging, outbound `to`, inbound `rules` / `from` and MeshTrafficPermission decisions.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use weft_core::policy::{self, ProxyView};
use weft_core::spec::policies::Action;
use weft_core::{Kind, Resource};

/// The fixture dataplane: inbounds `backend` (v2, 18080) and `backend-grpc` (19090), outbounds
/// `payments` and `ledger`, in zone east.
const DATAPLANE: &str = include_str!("fixtures/dataplane.yaml");

fn parse(yaml: &str) -> Vec<Resource> {
    weft_core::document::parse(yaml).unwrap_or_else(|e| panic!("test YAML: {e}"))
}

fn mk_dataplane() -> Resource {
    parse(DATAPLANE).remove(0)
}

fn resolve(yaml: &str) -> ProxyView {
    policy::resolve(&mk_dataplane(), &parse(yaml)).expect("resolves")
}

fn inbound(view: &ProxyView, port: u16) -> &policy::InboundView {
    view.inbounds
        .iter()
        .find(|i| i.port == port)
        .unwrap_or_else(|| panic!("no inbound {port}"))
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A mesh-wide MeshTimeout and a more specific one for the `backend` service; the specific
/// one is named so that name order alone would put it first (and lose).
const TIMEOUTS: &str = r#"
type: MeshTimeout
name: zz-mesh-defaults
mesh: default
spec:
  targetRef: {kind: Mesh}
  to:
    - targetRef: {kind: Mesh}
      default:
        connectionTimeout: 5s
        idleTimeout: 1h
        http: {requestTimeout: 15s, streamIdleTimeout: 30m}
  rules:
    - default: {idleTimeout: 10m, http: {requestTimeout: 30s}}
---
type: MeshTimeout
name: aa-backend
mesh: default
spec:
  targetRef: {kind: MeshService, name: backend}
  to:
    - targetRef: {kind: MeshService, name: payments}
      default: {http: {requestTimeout: 2s}}
  rules:
    - default: {http: {requestTimeout: 5s}}
"#;

#[test]
fn mesh_wide_timeout_is_overridden_field_by_field() {
    let view = resolve(TIMEOUTS);
    // payments: the mesh conf with only requestTimeout replaced.
    assert_eq!(
        view.outbounds["payments"][&Kind::MeshTimeout],
        json!({"connectionTimeout": "5s", "idleTimeout": "1h",
               "http": {"requestTimeout": "2s", "streamIdleTimeout": "30m"}})
    );
    // ledger: only the mesh-wide entry names it.
    assert_eq!(
        view.outbounds["ledger"][&Kind::MeshTimeout],
        json!({"connectionTimeout": "5s", "idleTimeout": "1h",
               "http": {"requestTimeout": "15s", "streamIdleTimeout": "30m"}})
    );
    // Inbound rules: the backend inbound gets the override, backend-grpc does not.
    assert_eq!(
        inbound(&view, 18080).rules[&Kind::MeshTimeout],
        json!({"idleTimeout": "10m", "http": {"requestTimeout": "5s"}})
    );
    assert_eq!(
        inbound(&view, 19090).rules[&Kind::MeshTimeout],
        json!({"idleTimeout": "10m", "http": {"requestTimeout": "30s"}})
    );
}

#[test]
fn zone_origin_beats_global_at_equal_specificity() {
    // By name, `b-global` would come last and win; the zone-originated one wins instead.
    let view = resolve(
        r#"
type: MeshRetry
name: b-global
mesh: default
labels: {weft.io/origin: global}
spec:
  to:
    - targetRef: {kind: Mesh}
      default: {http: {numRetries: 3, perTryTimeout: 1s}}
---
type: MeshRetry
name: a-zone
mesh: default
labels: {weft.io/origin: zone, weft.io/zone: east}
spec:
  to:
    - targetRef: {kind: Mesh}
      default: {http: {numRetries: 7}}
---
type: MeshRetry
name: c-other-zone
mesh: default
labels: {weft.io/origin: zone, weft.io/zone: west}
spec:
  to:
    - targetRef: {kind: Mesh}
      default: {http: {numRetries: 99}}
"#,
    );
    // Zone east wins numRetries; the global perTryTimeout stays; zone west's is not ours.
    for dest in ["payments", "ledger"] {
        assert_eq!(
            view.outbounds[dest][&Kind::MeshRetry],
            json!({"http": {"numRetries": 7, "perTryTimeout": "1s"}}),
            "{dest}"
        );
    }
}

#[test]
fn equal_specificity_and_origin_are_ordered_by_name() {
    let view = resolve(
        r#"
type: MeshCircuitBreaker
name: beta
mesh: default
spec:
  to:
    - targetRef: {kind: Mesh}
      default: {connectionLimits: {maxConnections: 200}}
---
type: MeshCircuitBreaker
name: alpha
mesh: default
spec:
  to:
    - targetRef: {kind: Mesh}
      default: {connectionLimits: {maxConnections: 100, maxPendingRequests: 50}}
"#,
    );
    assert_eq!(
        view.outbounds["payments"][&Kind::MeshCircuitBreaker],
        json!({"connectionLimits": {"maxConnections": 200, "maxPendingRequests": 50}})
    );
}

#[test]
fn mesh_subset_selects_only_the_inbound_with_its_tags() {
    let view = resolve(
        r#"
type: MeshTimeout
name: v2-only
mesh: default
spec:
  targetRef: {kind: MeshSubset, tags: {version: v2}}
  rules:
    - default: {idleTimeout: 1m}
  from:
    - targetRef: {kind: MeshService, name: frontend}
      default: {http: {requestTimeout: 3s}}
"#,
    );
    let v2 = inbound(&view, 18080);
    assert_eq!(v2.service, "backend");
    assert_eq!(v2.rules[&Kind::MeshTimeout], json!({"idleTimeout": "1m"}));
    assert_eq!(v2.from[&Kind::MeshTimeout].len(), 1);
    assert_eq!(
        v2.conf_for(Kind::MeshTimeout, "frontend", &BTreeMap::new()),
        Some(json!({"idleTimeout": "1m", "http": {"requestTimeout": "3s"}}))
    );
    let grpc = inbound(&view, 19090);
    assert!(grpc.rules.is_empty(), "{grpc:?}");
    assert!(grpc.from.is_empty(), "{grpc:?}");
}

#[test]
fn to_entries_resolve_per_destination() {
    // The Mesh entry is written last but is less specific, so the named entries win over it;
    // `payments-api` is external: only the MeshExternalService entry names it.
    let dataplane = r#"
type: Dataplane
name: web-1
mesh: default
spec:
  networking:
    address: 10.0.2.1
    inbound:
      - port: 8080
        tags: {weft.io/service: web}
    outbound:
      - port: 10001
        tags: {weft.io/service: payments}
      - port: 10002
        tags: {weft.io/service: ledger}
      - port: 10003
        tags: {weft.io/service: payments-api}
"#;
    let others = format!(
        "{}\n---\n{}",
        include_str!("fixtures/meshexternalservice.yaml"),
        r#"
type: MeshRetry
name: retries
mesh: default
spec:
  to:
    - targetRef: {kind: MeshService, name: payments}
      default: {http: {numRetries: 5}}
    - targetRef: {kind: MeshService, name: ledger}
      default: {tcp: {maxConnectAttempt: 2}}
    - targetRef: {kind: MeshService, name: payments-api}
      default: {http: {numRetries: 100}}
    - targetRef: {kind: MeshExternalService, name: payments-api}
      default: {http: {numRetries: 1}}
    - targetRef: {kind: Mesh}
      default: {http: {numRetries: 2, perTryTimeout: 500ms}}
"#
    );
    let view = policy::resolve(&parse(dataplane).remove(0), &parse(&others)).unwrap();
    assert_eq!(
        view.outbounds["payments"][&Kind::MeshRetry],
        json!({"http": {"numRetries": 5, "perTryTimeout": "500ms"}})
    );
    assert_eq!(
        view.outbounds["ledger"][&Kind::MeshRetry],
        json!({"tcp": {"maxConnectAttempt": 2}, "http": {"numRetries": 2, "perTryTimeout": "500ms"}})
    );
    assert_eq!(
        view.outbounds["payments-api"][&Kind::MeshRetry],
        json!({"http": {"numRetries": 1, "perTryTimeout": "500ms"}})
    );
}

#[test]
fn traffic_permission_specific_deny_beats_mesh_allow() {
    let view = resolve(
        r#"
type: MeshTrafficPermission
name: allow-all
mesh: default
spec:
  targetRef: {kind: Mesh}
  from:
    - targetRef: {kind: Mesh}
      default: {action: Allow}
---
type: MeshTrafficPermission
name: backend-sources
mesh: default
spec:
  targetRef: {kind: MeshService, name: backend}
  from:
    - targetRef: {kind: MeshSubset, tags: {env: dev}}
      default: {action: Deny}
    - targetRef: {kind: MeshServiceSubset, name: frontend, tags: {env: dev}}
      default: {action: Allow}
"#,
    );
    let backend = inbound(&view, 18080);
    let dev = tags(&[("env", "dev")]);
    assert_eq!(backend.allows("web", &dev, false), Action::Deny);
    assert_eq!(backend.allows("web", &tags(&[]), false), Action::Allow);
    // More specific still: frontend's dev instances are allowed.
    assert_eq!(backend.allows("frontend", &dev, false), Action::Allow);
    // The mesh-wide allow also beats default-deny.
    assert_eq!(backend.allows("web", &tags(&[]), true), Action::Allow);
    // backend-grpc is not selected by the second policy.
    assert_eq!(
        inbound(&view, 19090).allows("web", &dev, false),
        Action::Allow
    );
    // Entries are listed least specific first.
    let kinds: Vec<&str> = backend.from[&Kind::MeshTrafficPermission]
        .iter()
        .map(|e| e.target_ref.kind.name())
        .collect();
    assert_eq!(kinds, ["Mesh", "MeshSubset", "MeshServiceSubset"]);
}

#[test]
fn traffic_permission_most_specific_source_wins_across_policies() {
    // The deny sits in the less specific policy, but its source is more specific.
    let view = resolve(
        r#"
type: MeshTrafficPermission
name: no-legacy
mesh: default
spec:
  from:
    - targetRef: {kind: MeshService, name: legacy}
      default: {action: Deny}
---
type: MeshTrafficPermission
name: backend-open
mesh: default
spec:
  targetRef: {kind: MeshService, name: backend}
  from:
    - targetRef: {kind: Mesh}
      default: {action: Allow}
"#,
    );
    let backend = inbound(&view, 18080);
    assert_eq!(backend.allows("legacy", &tags(&[]), true), Action::Deny);
    assert_eq!(backend.allows("web", &tags(&[]), true), Action::Allow);
}

#[test]
fn traffic_permission_falls_back_to_the_mesh_default() {
    let view = resolve(include_str!("fixtures/meshtrafficpermission.yaml"));
    let backend = inbound(&view, 18080);
    let none = tags(&[]);
    assert_eq!(backend.allows("frontend", &none, true), Action::Allow);
    assert_eq!(
        backend.allows("web", &tags(&[("env", "dev")]), false),
        Action::Deny
    );
    // No entry names `web` in prod: the mesh default decides.
    assert_eq!(backend.allows("web", &none, true), Action::Deny);
    assert_eq!(backend.allows("web", &none, false), Action::Allow);
    // backend-grpc has no permission at all.
    let grpc = inbound(&view, 19090);
    assert_eq!(grpc.allows("frontend", &none, true), Action::Deny);
    assert_eq!(grpc.allows("frontend", &none, false), Action::Allow);
}

#[test]
fn top_level_default_is_merged_for_the_proxy() {
    let yaml = format!(
        "{}\n---\n{}",
        include_str!("fixtures/meshtrace.yaml"),
        r#"
type: MeshTrace
name: backend-sampling
mesh: default
spec:
  targetRef: {kind: MeshSubset, tags: {version: v2}}
  default:
    sampling: {overall: 100}
    tags: [{name: tier, literal: core}]
---
type: MeshTrace
name: not-us
mesh: default
spec:
  targetRef: {kind: MeshService, name: frontend}
  default:
    sampling: {overall: 1}
"#
    );
    let view = resolve(&yaml);
    let trace = &view.proxy[&Kind::MeshTrace];
    assert_eq!(
        trace["sampling"],
        json!({"overall": 100, "client": 100, "random": 12.5})
    );
    // Arrays are replaced whole.
    assert_eq!(trace["tags"], json!([{"name": "tier", "literal": "core"}]));
    assert_eq!(
        trace["backends"][0]["zipkin"]["url"],
        "http://jaeger-collector.observability:9411/api/v2/spans"
    );
}

#[test]
fn policies_of_another_mesh_are_ignored() {
    let view = resolve(
        r#"
type: MeshTimeout
name: elsewhere
mesh: other
spec:
  to:
    - targetRef: {kind: Mesh}
      default: {connectionTimeout: 1s}
  rules:
    - default: {idleTimeout: 1s}
---
type: MeshMetric
name: elsewhere
mesh: other
spec:
  default: {sidecar: {includeUnused: true}}
"#,
    );
    assert!(view.outbounds.values().all(BTreeMap::is_empty), "{view:?}");
    assert!(view.inbounds.iter().all(|i| i.rules.is_empty()));
    assert!(view.proxy.is_empty());
}

#[test]
fn dataplane_by_name_and_labels_and_routes_unmatched() {
    let view = resolve(
        r#"
type: MeshTimeout
name: by-label
mesh: default
spec:
  targetRef: {kind: Dataplane, labels: {weft.io/zone: east}}
  rules:
    - default: {idleTimeout: 2m}
---
type: MeshTimeout
name: by-name
mesh: default
spec:
  targetRef: {kind: Dataplane, name: backend-1, sectionName: "19090"}
  rules:
    - default: {idleTimeout: 3m}
---
type: MeshTimeout
name: some-other-proxy
mesh: default
spec:
  targetRef: {kind: Dataplane, name: backend-2}
  rules:
    - default: {idleTimeout: 4m}
---
type: MeshTimeout
name: on-a-route
mesh: default
spec:
  targetRef: {kind: MeshHTTPRoute, name: backend-canary}
  to:
    - targetRef: {kind: Mesh}
      default: {connectionTimeout: 9s}
"#,
    );
    assert_eq!(
        inbound(&view, 18080).rules[&Kind::MeshTimeout],
        json!({"idleTimeout": "2m"})
    );
    assert_eq!(
        inbound(&view, 19090).rules[&Kind::MeshTimeout],
        json!({"idleTimeout": "3m"})
    );
    assert!(view.outbounds.values().all(BTreeMap::is_empty), "{view:?}");
}

#[test]
fn routes_merge_rules_by_matches() {
    let view = resolve(
        r#"
type: MeshHTTPRoute
name: mesh-route
mesh: default
spec:
  to:
    - targetRef: {kind: MeshService, name: payments}
      rules:
        - matches: [{path: {type: PathPrefix, value: /api}}]
          default:
            backendRefs: [{kind: MeshService, name: payments-v1}]
---
type: MeshHTTPRoute
name: backend-route
mesh: default
spec:
  targetRef: {kind: MeshService, name: backend}
  to:
    - targetRef: {kind: MeshService, name: payments}
      rules:
        - matches: [{path: {type: PathPrefix, value: /api}}]
          default:
            backendRefs: [{kind: MeshService, name: payments-v2}]
        - matches: [{method: POST}]
          default:
            backendRefs: [{kind: MeshService, name: payments-writer}]
"#,
    );
    let rules = &view.outbounds["payments"][&Kind::MeshHTTPRoute]["rules"];
    assert_eq!(rules.as_array().unwrap().len(), 2, "{rules}");
    assert_eq!(rules[0]["default"]["backendRefs"][0]["name"], "payments-v2");
    assert_eq!(
        rules[1]["default"]["backendRefs"][0]["name"],
        "payments-writer"
    );
    assert!(view.outbounds["ledger"].is_empty());
}

#[test]
fn a_non_dataplane_is_refused() {
    let timeouts = parse(TIMEOUTS);
    let err = policy::resolve(&timeouts[0], &timeouts).unwrap_err();
    assert!(err.to_string().contains("not a Dataplane"), "{err}");
}

/// The full view for one scenario, as the zone would send it.
const SNAPSHOT: &str = r#"{
  "mesh": "default",
  "dataplane": "backend-1",
  "mtls": false,
  "defaultDeny": false,
  "inbounds": [
    {
      "port": 18080,
      "service": "backend",
      "tags": {
        "version": "v2",
        "weft.io/service": "backend"
      },
      "rules": {
        "MeshTimeout": {
          "http": {
            "requestTimeout": "5s"
          },
          "idleTimeout": "10m"
        }
      },
      "from": {
        "MeshTrafficPermission": [
          {
            "targetRef": {
              "kind": "MeshSubset",
              "tags": {
                "env": "dev"
              }
            },
            "conf": {
              "action": "Deny"
            }
          },
          {
            "targetRef": {
              "kind": "MeshService",
              "name": "frontend"
            },
            "conf": {
              "action": "Allow"
            }
          }
        ]
      }
    },
    {
      "port": 19090,
      "service": "backend-grpc",
      "tags": {
        "weft.io/service": "backend-grpc"
      },
      "rules": {
        "MeshTimeout": {
          "http": {
            "requestTimeout": "30s"
          },
          "idleTimeout": "10m"
        }
      }
    }
  ],
  "outbounds": {
    "ledger": {
      "MeshTimeout": {
        "connectionTimeout": "5s",
        "http": {
          "requestTimeout": "15s",
          "streamIdleTimeout": "30m"
        },
        "idleTimeout": "1h"
      }
    },
    "payments": {
      "MeshTimeout": {
        "connectionTimeout": "5s",
        "http": {
          "requestTimeout": "2s",
          "streamIdleTimeout": "30m"
        },
        "idleTimeout": "1h"
      }
    }
  }
}"#;

fn snapshot_inputs() -> String {
    format!(
        "{TIMEOUTS}\n---\n{}",
        include_str!("fixtures/meshtrafficpermission.yaml")
    )
}

#[test]
fn output_is_deterministic_and_matches_the_snapshot() {
    let mut policies = parse(&snapshot_inputs());
    let view = policy::resolve(&mk_dataplane(), &policies).unwrap();
    let text = serde_json::to_string_pretty(&view).unwrap();
    assert_eq!(text, serde_json::to_string_pretty(&view).unwrap());
    // Input order does not matter.
    policies.reverse();
    let reversed = policy::resolve(&mk_dataplane(), &policies).unwrap();
    assert_eq!(text, serde_json::to_string_pretty(&reversed).unwrap());
    assert_eq!(text, SNAPSHOT, "actual:\n{text}");
    // It reads back: what the proxy decodes is what the zone sent.
    let back: ProxyView = serde_json::from_str(&text).unwrap();
    assert_eq!(back, view);
    let _: Value = serde_json::from_str(SNAPSHOT).unwrap();
}

#[test]
fn mesh_service_refs_by_labels_and_port_names_use_the_mesh_services() {
    let view = resolve(
        r#"
type: MeshService
name: backend
mesh: default
labels: {team: core}
spec:
  selector: {dataplaneTags: {weft.io/service: backend}}
  ports: [{port: 80, targetPort: 18080, name: http}]
---
type: MeshService
name: frontend
mesh: default
labels: {team: web}
spec:
  selector: {dataplaneTags: {weft.io/service: frontend}}
  ports: [{port: 80}]
---
type: MeshService
name: payments
mesh: default
labels: {team: money}
spec:
  selector: {dataplaneTags: {weft.io/service: payments}}
  ports: [{port: 80}]
---
type: MeshTrafficPermission
name: core-from-web
mesh: default
spec:
  targetRef: {kind: MeshService, labels: {team: core}}
  from:
    - targetRef: {kind: MeshService, labels: {team: web}}
      default: {action: Allow}
---
type: MeshTimeout
name: http-port
mesh: default
spec:
  targetRef: {kind: MeshService, name: backend, sectionName: http}
  rules:
    - default: {idleTimeout: 7m}
  to:
    - targetRef: {kind: MeshService, labels: {team: money}}
      default: {connectionTimeout: 3s}
"#,
    );
    let backend = inbound(&view, 18080);
    assert_eq!(
        backend.from[&Kind::MeshTrafficPermission][0].services,
        ["frontend"]
    );
    assert_eq!(backend.allows("frontend", &tags(&[]), true), Action::Allow);
    assert_eq!(backend.allows("web", &tags(&[]), true), Action::Deny);
    assert_eq!(
        backend.rules[&Kind::MeshTimeout],
        json!({"idleTimeout": "7m"})
    );
    let grpc = inbound(&view, 19090);
    assert!(grpc.from.is_empty() && grpc.rules.is_empty(), "{grpc:?}");
    assert_eq!(
        view.outbounds["payments"][&Kind::MeshTimeout],
        json!({"connectionTimeout": "3s"})
    );
    assert!(view.outbounds["ledger"].is_empty());
}

#[test]
fn the_mesh_decides_mtls_and_default_deny() {
    let mesh = |spec: &str| parse(&format!("type: Mesh\nname: default\nspec: {spec}\n"));
    let mtls = "{mtls: {enabledBackend: ca-1, backends: [{name: ca-1, type: builtin}]}}";
    let view = policy::resolve(&mk_dataplane(), &mesh(mtls)).unwrap();
    assert!(view.mtls && view.default_deny, "mTLS on: deny by default");
    let open = "{mtls: {enabledBackend: ca-1, backends: [{name: ca-1, type: builtin}]}, defaultDeny: false}";
    let view = policy::resolve(&mk_dataplane(), &mesh(open)).unwrap();
    assert!(view.mtls && !view.default_deny, "defaultDeny: false wins");
    let view = policy::resolve(&mk_dataplane(), &mesh("{defaultDeny: true}")).unwrap();
    assert!(!view.mtls && view.default_deny);
    let view = policy::resolve(&mk_dataplane(), &mesh("{}")).unwrap();
    assert!(!view.mtls && !view.default_deny);
}
