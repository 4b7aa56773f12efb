//! Every kind's typed spec, end to end through the document form: a realistic document of
//! each kind parses, and its YAML and JSON forms round-trip to an equal `Resource`.

use std::collections::BTreeSet;

use serde_json::Value;
use weft_core::document::{parse, to_json, to_yaml, yaml_values};
use weft_core::{Kind, Resource};

/// One valid document per kind, in `Kind::ALL` order. The files double as examples.
const DOCS: &[(Kind, &str)] = &[
    (Kind::Mesh, include_str!("fixtures/mesh.yaml")),
    (Kind::Zone, include_str!("fixtures/zone.yaml")),
    (Kind::Dataplane, include_str!("fixtures/dataplane.yaml")),
    (Kind::ZoneIngress, include_str!("fixtures/zoneingress.yaml")),
    (Kind::ZoneEgress, include_str!("fixtures/zoneegress.yaml")),
    (Kind::MeshService, include_str!("fixtures/meshservice.yaml")),
    (
        Kind::MeshExternalService,
        include_str!("fixtures/meshexternalservice.yaml"),
    ),
    (
        Kind::MeshTrafficPermission,
        include_str!("fixtures/meshtrafficpermission.yaml"),
    ),
    (Kind::MeshTimeout, include_str!("fixtures/meshtimeout.yaml")),
    (Kind::MeshRetry, include_str!("fixtures/meshretry.yaml")),
    (
        Kind::MeshCircuitBreaker,
        include_str!("fixtures/meshcircuitbreaker.yaml"),
    ),
    (
        Kind::MeshHealthCheck,
        include_str!("fixtures/meshhealthcheck.yaml"),
    ),
    (
        Kind::MeshRateLimit,
        include_str!("fixtures/meshratelimit.yaml"),
    ),
    (
        Kind::MeshFaultInjection,
        include_str!("fixtures/meshfaultinjection.yaml"),
    ),
    (
        Kind::MeshLoadBalancingStrategy,
        include_str!("fixtures/meshloadbalancingstrategy.yaml"),
    ),
    (
        Kind::MeshHTTPRoute,
        include_str!("fixtures/meshhttproute.yaml"),
    ),
    (
        Kind::MeshTCPRoute,
        include_str!("fixtures/meshtcproute.yaml"),
    ),
    (
        Kind::MeshAccessLog,
        include_str!("fixtures/meshaccesslog.yaml"),
    ),
    (Kind::MeshTrace, include_str!("fixtures/meshtrace.yaml")),
    (Kind::MeshMetric, include_str!("fixtures/meshmetric.yaml")),
];

fn parse_one(kind: Kind, text: &str) -> Resource {
    let mut rs = parse(text).unwrap_or_else(|e| panic!("{kind}: valid fixture rejected:\n{e}"));
    assert_eq!(rs.len(), 1, "{kind}");
    let r = rs.remove(0);
    assert_eq!(r.kind, kind);
    r
}

#[test]
fn every_kind_has_a_fixture() {
    let kinds: Vec<Kind> = DOCS.iter().map(|d| d.0).collect();
    assert_eq!(kinds, Kind::ALL);
}

#[test]
fn every_kind_parses_and_round_trips_through_yaml() {
    for &(kind, text) in DOCS {
        let r = parse_one(kind, text);
        let yaml = to_yaml(std::slice::from_ref(&r));
        let again =
            parse(&yaml).unwrap_or_else(|e| panic!("{kind}: own YAML rejected: {e}\n{yaml}"));
        assert_eq!(
            again,
            [r],
            "{kind}: YAML round trip changed the resource:\n{yaml}"
        );
    }
}

#[test]
fn every_kind_round_trips_through_json() {
    for &(kind, text) in DOCS {
        let r = parse_one(kind, text);
        let json = to_json(std::slice::from_ref(&r));
        let again =
            parse(&json).unwrap_or_else(|e| panic!("{kind}: own JSON rejected: {e}\n{json}"));
        assert_eq!(
            again,
            [r],
            "{kind}: JSON round trip changed the resource:\n{json}"
        );
    }
}

/// Every key path in `v` (`networking.inbound[].tags.version`), for comparing shapes.
fn key_paths(prefix: &str, v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = format!("{prefix}.{k}");
                out.insert(p.clone());
                key_paths(&p, v, out);
            }
        }
        Value::Array(items) => {
            for v in items {
                key_paths(&format!("{prefix}[]"), v, out);
            }
        }
        _ => {}
    }
}

#[test]
fn typed_specs_keep_every_field_a_fixture_sets() {
    // A typed spec that forgot a field would drop it silently on output; this catches that
    // (and a fixture that sets nothing the typed spec reads).
    for &(kind, text) in DOCS {
        let input = yaml_values(text).unwrap().remove(0);
        let r = parse_one(kind, text);
        let (mut want, mut got) = (BTreeSet::new(), BTreeSet::new());
        key_paths("spec", &input["spec"], &mut want);
        key_paths("spec", &r.spec, &mut got);
        let missing: Vec<_> = want.difference(&got).collect();
        assert!(
            missing.is_empty(),
            "{kind}: canonical spec lost {missing:?}"
        );
        let added: Vec<_> = got.difference(&want).collect();
        // Only defaults the schema fills in may appear.
        assert!(
            added
                .iter()
                .all(|p| p.as_str() == "spec.targetRef" || p.as_str() == "spec.targetRef.kind"),
            "{kind}: added {added:?}"
        );
    }
}

#[test]
fn all_kinds_in_one_stream_round_trip() {
    let text: Vec<&str> = DOCS.iter().map(|d| d.1).collect();
    let text = text.join("---\n");
    let rs = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let kinds: Vec<Kind> = rs.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, Kind::ALL);

    let yaml = to_yaml(&rs);
    assert_eq!(
        yaml.matches("\n---\n").count(),
        Kind::ALL.len() - 1,
        "{yaml}"
    );
    assert_eq!(parse(&yaml).unwrap(), rs);
    assert_eq!(parse(&to_json(&rs)).unwrap(), rs);
    // Output is a fixed point: printing what was parsed from output gives the same text.
    assert_eq!(to_yaml(&parse(&yaml).unwrap()), yaml);
}

#[test]
fn spellings_of_the_same_spec_are_equal_resources() {
    let a = parse(
        "type: MeshTimeout\nname: t\nmesh: default\nspec:\n  to:\n    - targetRef: {kind: Mesh}\n      default: {idleTimeout: 90s}\n",
    )
    .unwrap();
    let b = parse(
        r#"{"type": "MeshTimeout", "name": "t", "mesh": "default", "spec": {"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "Mesh"}, "default": {"idleTimeout": "1m30s"}}]}}"#,
    )
    .unwrap();
    assert_eq!(a, b);
    assert!(a[0].same_content(&b[0]));
}

#[test]
fn canonical_form() {
    // Durations print largest unit first (90s is 1m30s), percentages given as strings become
    // numbers, IPs are normalized, retry statuses become strings, and the default top-level
    // targetRef is spelled out.
    let input = r#"
type: MeshFaultInjection
name: chaos
mesh: default
spec:
  from:
    - targetRef: {kind: Mesh}
      default:
        http:
          - delay: {value: 90s, percentage: "50"}
          - abort: {httpStatus: 503, percentage: 12.5}
---
type: MeshRetry
name: retries
mesh: default
spec:
  to:
    - targetRef: {kind: Mesh}
      default:
        http: {perTryTimeout: 1500ms, retryOn: [503, 5xx]}
---
type: ZoneEgress
name: egress
spec:
  networking: {address: "0:0:0:0:0:0:0:1", port: 10002}
"#;
    let expected = r#"type: MeshFaultInjection
name: chaos
mesh: default
spec:
  from:
  - default:
      http:
      - delay:
          percentage: 50
          value: 1m30s
      - abort:
          httpStatus: 503
          percentage: 12.5
    targetRef:
      kind: Mesh
  targetRef:
    kind: Mesh
---
type: MeshRetry
name: retries
mesh: default
spec:
  targetRef:
    kind: Mesh
  to:
  - default:
      http:
        perTryTimeout: 1s500ms
        retryOn:
        - "503"
        - 5xx
    targetRef:
      kind: Mesh
---
type: ZoneEgress
name: egress
spec:
  networking:
    address: "::1"
    port: 10002
"#;
    let rs = parse(input).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(to_yaml(&rs), expected);
}
