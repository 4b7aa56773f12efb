//! Bad input: every rejection names the field (the exact path) and says what to do.

use weft_core::document::{DocumentError, parse};

/// The documents' errors as `(document index, field, message)`.
fn errors(text: &str) -> Vec<(usize, String, String)> {
    let err = match parse(text) {
        Ok(rs) => panic!("accepted, expected an error:\n{text}\nparsed: {rs:?}"),
        Err(e) => e,
    };
    err.0
        .iter()
        .flat_map(|d: &DocumentError| {
            d.invalid
                .errors
                .iter()
                .map(move |e| (d.index, e.field.clone(), e.message.clone()))
        })
        .collect()
}

/// Assert the input is rejected with an error at exactly `field` whose message contains `fragment`.
#[track_caller]
fn expect(text: &str, field: &str, fragment: &str) {
    let errs = errors(text);
    assert!(
        errs.iter()
            .any(|(_, f, m)| f == field && m.contains(fragment)),
        "expected `{field}: ...{fragment}...`, got:\n{}\ninput:\n{text}",
        errs.iter()
            .map(|(i, f, m)| format!("  [{i}] {f}: {m}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Assert the only error is exactly `field: message`.
#[track_caller]
fn expect_exactly(text: &str, field: &str, message: &str) {
    let errs = errors(text);
    assert_eq!(
        errs,
        [(1, field.to_string(), message.to_string())],
        "input:\n{text}"
    );
}

/// A mesh-scoped document in mesh `default` with a flow-style spec.
fn doc(kind: &str, spec: &str) -> String {
    format!("type: {kind}\nname: x\nmesh: default\nspec: {spec}\n")
}

/// A global-scoped document.
fn global_doc(kind: &str, spec: &str) -> String {
    format!("type: {kind}\nname: x\nspec: {spec}\n")
}

// ---------------------------------------------------------------------------------------------
// The document and the shared policy shape

#[test]
fn unknown_field() {
    let text = doc(
        "MeshTimeout",
        "{to: [{targetRef: {kind: Mesh}, default: {idleTimeout: 1s, foo: 1}}]}",
    );
    expect_exactly(
        &text,
        "spec.to[0].default.foo",
        "unknown field `foo`, expected one of `connectionTimeout`, `idleTimeout`, `http`",
    );
}

#[test]
fn bad_duration() {
    let text = doc(
        "MeshTimeout",
        "{to: [{targetRef: {kind: Mesh}, default: {http: {requestTimeout: 5 seconds}}}]}",
    );
    expect_exactly(
        &text,
        "spec.to[0].default.http.requestTimeout",
        r#"invalid duration "5 seconds" (expected e.g. 5s, 250ms, 1m30s)"#,
    );
}

#[test]
fn name_not_a_dns_label() {
    let text = "type: MeshTimeout\nname: Backend_Timeouts\nmesh: default\nspec: {to: [{targetRef: {kind: Mesh}, default: {idleTimeout: 1s}}]}\n";
    expect(
        text,
        "name",
        r#"invalid name "Backend_Timeouts" (expected a DNS label"#,
    );
}

#[test]
fn missing_required_fields() {
    expect(
        "type: MeshTimeout\nmesh: default\nspec: {}\n",
        "",
        "missing field `name`",
    );
    expect(
        &doc("Dataplane", "{networking: {inbound: []}}"),
        "spec.networking",
        "missing field `address`",
    );
    expect(
        &doc(
            "MeshFaultInjection",
            "{from: [{targetRef: {kind: Mesh}, default: {http: [{abort: {httpStatus: 503}}]}}]}",
        ),
        "spec.from[0].default.http[0].abort",
        "missing field `percentage`",
    );
}

#[test]
fn unknown_kind() {
    let errs = errors("type: MeshTimer\nname: x\nmesh: default\nspec: {}\n");
    assert_eq!(errs.len(), 1);
    let (_, field, message) = &errs[0];
    assert_eq!(field, "type");
    assert!(
        message.starts_with(r#"unknown kind "MeshTimer" (expected one of Mesh, Zone, Dataplane,"#),
        "{message}"
    );
    assert!(
        message.contains("MeshTimeout"),
        "lists the right spelling: {message}"
    );
}

#[test]
fn malformed_yaml_names_the_line() {
    let errs = errors("type: MeshTimeout\nname: x\nmesh: default\nspec:\n  to: [unclosed\n");
    assert_eq!(errs.len(), 1);
    let (index, field, message) = &errs[0];
    assert_eq!((*index, field.as_str()), (1, ""));
    assert!(message.starts_with("malformed YAML: "), "{message}");
    assert!(message.contains("line"), "mentions a line: {message}");
}

#[test]
fn malformed_json() {
    let errs = errors(r#"{"type": "MeshTimeout", "name": }"#);
    assert!(
        errs[0].2.starts_with("malformed JSON: ") && errs[0].2.contains("line 1"),
        "{errs:?}"
    );
}

#[test]
fn spec_that_is_not_an_object() {
    expect_exactly(
        &doc("MeshTimeout", "[1, 2]"),
        "spec",
        "expected an object, got [1,2]",
    );
}

#[test]
fn target_ref_kind_not_allowed_at_top() {
    // (A MeshTrafficPermission may target a MeshExternalService: the zone egress enforces it.)
    let text = doc(
        "MeshTimeout",
        "{targetRef: {kind: MeshExternalService, name: ext}, to: [{targetRef: {kind: Mesh}, default: {idleTimeout: 1s}}]}",
    );
    expect_exactly(
        &text,
        "spec.targetRef.kind",
        "MeshExternalService is not allowed here (allowed: Mesh, MeshSubset, MeshService, MeshServiceSubset, Dataplane, MeshHTTPRoute)",
    );
}

#[test]
fn target_ref_kind_not_allowed_in_to() {
    let text = doc(
        "MeshTimeout",
        "{to: [{targetRef: {kind: MeshSubset, tags: {v: a}}, default: {idleTimeout: 1s}}]}",
    );
    expect_exactly(
        &text,
        "spec.to[0].targetRef.kind",
        "MeshSubset is not allowed here (allowed: Mesh, MeshService, MeshExternalService)",
    );
}

#[test]
fn target_ref_kind_not_allowed_in_from() {
    let text = doc(
        "MeshTimeout",
        "{from: [{targetRef: {kind: MeshExternalService, name: ext}, default: {idleTimeout: 1s}}]}",
    );
    expect_exactly(
        &text,
        "spec.from[0].targetRef.kind",
        "MeshExternalService is not allowed here (allowed: Mesh, MeshSubset, MeshService, MeshServiceSubset)",
    );
}

#[test]
fn target_ref_shape() {
    expect(
        &doc(
            "MeshTimeout",
            "{to: [{targetRef: {kind: MeshService}, default: {idleTimeout: 1s}}]}",
        ),
        "spec.to[0].targetRef.name",
        "MeshService needs exactly one of name or labels",
    );
    expect(
        &doc(
            "MeshTimeout",
            "{to: [{targetRef: {kind: Mesh, name: all}, default: {idleTimeout: 1s}}]}",
        ),
        "spec.to[0].targetRef.name",
        "not allowed with kind Mesh (remove it)",
    );
    expect(
        &doc(
            "MeshTimeout",
            "{to: [{targetRef: {kind: MeshGateway}, default: {idleTimeout: 1s}}]}",
        ),
        "spec.to[0].targetRef.kind",
        "unknown variant `MeshGateway`",
    );
}

#[test]
fn sections_a_policy_does_not_have() {
    expect_exactly(
        &doc(
            "MeshTrafficPermission",
            "{to: [{targetRef: {kind: Mesh}, default: {action: Allow}}]}",
        ),
        "spec.to",
        "not allowed for this policy (use from, rules instead)",
    );
    expect_exactly(
        &doc(
            "MeshTrace",
            "{to: [{targetRef: {kind: Mesh}, default: {}}]}",
        ),
        "spec.to",
        "not allowed for this policy (use default instead)",
    );
    expect_exactly(
        &doc("MeshTimeout", "{default: {idleTimeout: 1s}}"),
        "spec.default",
        "not allowed for this policy (use to, from, rules instead)",
    );
    expect_exactly(
        &doc("MeshTimeout", "{}"),
        "spec",
        "missing configuration: set one of to, from, rules",
    );
    expect_exactly(
        &doc("MeshTimeout", "{to: []}"),
        "spec.to",
        "must not be empty (add an entry, or remove the field)",
    );
}

#[test]
fn mesh_scoped_kind_without_mesh() {
    let text = "type: MeshTimeout\nname: x\nspec: {to: [{targetRef: {kind: Mesh}, default: {idleTimeout: 1s}}]}\n";
    expect_exactly(
        text,
        "mesh",
        "required for MeshTimeout (e.g. mesh: default)",
    );
    expect(
        "type: ZoneEgress\nname: x\nmesh: default\nspec: {networking: {address: 10.0.0.1, port: 10002}}\n",
        "mesh",
        "not allowed: ZoneEgress is not mesh-scoped (remove the field)",
    );
}

#[test]
fn every_failing_document_is_reported_with_its_index() {
    let good = doc(
        "MeshTimeout",
        "{to: [{targetRef: {kind: Mesh}, default: {idleTimeout: 1s}}]}",
    );
    let bad_duration = doc(
        "MeshTimeout",
        "{to: [{targetRef: {kind: Mesh}, default: {idleTimeout: soon}}]}",
    );
    let bad_kind = "type: Nope\nname: y\n".to_string();
    let no_inbound = doc("Dataplane", "{networking: {address: 10.0.0.1}}");
    let text = [good.clone(), bad_duration, good, bad_kind, no_inbound].join("---\n");

    let err = parse(&text).unwrap_err();
    let indexes: Vec<usize> = err.0.iter().map(|d| d.index).collect();
    assert_eq!(indexes, [2, 4, 5]);
    assert_eq!(
        err.0[0].what.as_deref(),
        Some(r#"MeshTimeout "x" in mesh "default""#)
    );
    assert_eq!(
        err.0[0].invalid.errors[0].field,
        "spec.to[0].default.idleTimeout"
    );
    assert_eq!(err.0[1].invalid.errors[0].field, "type");
    assert_eq!(err.0[2].invalid.errors[0].field, "spec.networking.inbound");
    let shown = err.to_string();
    assert!(shown.starts_with(r#"document 2 (MeshTimeout "x" in mesh "default"): spec.to[0].default.idleTimeout: invalid duration "soon""#), "{shown}");
    assert_eq!(shown.lines().count(), 3, "{shown}");
}

#[test]
fn every_problem_in_one_document_is_reported() {
    let text = doc(
        "Dataplane",
        "{networking: {address: 10.0.0.1, inbound: [{port: 8080, tags: {version: v1}}, {port: 8080, tags: {weft.io/service: b}}]}}",
    );
    let fields: Vec<String> = errors(&text).into_iter().map(|e| e.1).collect();
    assert_eq!(
        fields,
        [
            "spec.networking.inbound[0].tags",
            "spec.networking.inbound[1].port"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// What each kind checks: (what, document, field, message fragment).

fn cases() -> Vec<(&'static str, String, &'static str, &'static str)> {
    let to = |conf: &str| {
        format!("{{to: [{{targetRef: {{kind: MeshService, name: backend}}, default: {conf}}}]}}")
    };
    let from = |conf: &str| format!("{{from: [{{targetRef: {{kind: Mesh}}, default: {conf}}}]}}");
    let route = |rules: &str| {
        format!("{{to: [{{targetRef: {{kind: MeshService, name: backend}}, rules: {rules}}}]}}")
    };
    let dp = |inbound: &str| format!("{{networking: {{address: 10.0.0.1, inbound: [{inbound}]}}}}");
    vec![
        // Mesh and Zone
        (
            "mtls backend that does not exist",
            global_doc(
                "Mesh",
                "{mtls: {enabledBackend: ca-2, backends: [{name: ca-1, type: builtin}]}}",
            ),
            "spec.mtls.enabledBackend",
            r#"no backend named "ca-2" in mtls.backends"#,
        ),
        (
            "zone unknown field",
            global_doc("Zone", "{enabled: true, region: east}"),
            "spec.region",
            "unknown field `region`",
        ),
        // Dataplane
        (
            "dataplane without inbound",
            doc("Dataplane", "{networking: {address: 10.0.0.1}}"),
            "spec.networking.inbound",
            "at least one inbound required",
        ),
        (
            "inbound without service tag",
            doc("Dataplane", &dp("{port: 8080, tags: {version: v1}}")),
            "spec.networking.inbound[0].tags",
            "missing weft.io/service: the service name, a DNS label (add e.g. weft.io/service: backend)",
        ),
        (
            "service tag not a DNS label",
            doc(
                "Dataplane",
                &dp("{port: 8080, tags: {weft.io/service: Backend_1}}"),
            ),
            "spec.networking.inbound[0].tags.weft.io/service",
            "weft.io/service must be a DNS label",
        ),
        (
            "duplicate inbound port",
            doc(
                "Dataplane",
                &dp(
                    "{port: 8080, tags: {weft.io/service: a}}, {port: 8080, tags: {weft.io/service: b}}",
                ),
            ),
            "spec.networking.inbound[1].port",
            "duplicate inbound port 8080 (inbound[0] uses it too",
        ),
        (
            "inbound protocol",
            doc(
                "Dataplane",
                &dp("{port: 8080, protocol: udp, tags: {weft.io/service: a}}"),
            ),
            "spec.networking.inbound[0].protocol",
            "unknown variant `udp`, expected one of `tcp`, `http`, `http2`, `grpc`",
        ),
        (
            "inbound port out of range",
            doc(
                "Dataplane",
                &dp("{port: 70000, tags: {weft.io/service: a}}"),
            ),
            "spec.networking.inbound[0].port",
            "invalid port 70000 (expected 1-65535)",
        ),
        (
            "dataplane address",
            doc(
                "Dataplane",
                "{networking: {address: not an address, inbound: [{port: 1, tags: {weft.io/service: a}}]}}",
            ),
            "spec.networking.address",
            "expected an IP address or a hostname",
        ),
        (
            "admin port used by an inbound",
            doc(
                "Dataplane",
                "{networking: {address: 10.0.0.1, admin: {port: 8080}, inbound: [{port: 8080, tags: {weft.io/service: a}}]}}",
            ),
            "spec.networking.admin.port",
            "already used by inbound[0]",
        ),
        (
            "outbound without service tag",
            doc(
                "Dataplane",
                "{networking: {address: 10.0.0.1, inbound: [{port: 1, tags: {weft.io/service: a}}], outbound: [{port: 10001, tags: {}}]}}",
            ),
            "spec.networking.outbound[0].tags",
            "missing weft.io/service",
        ),
        (
            "duplicate outbound",
            doc(
                "Dataplane",
                "{networking: {address: 10.0.0.1, inbound: [{port: 1, tags: {weft.io/service: a}}], outbound: [{port: 10001, tags: {weft.io/service: b}}, {port: 10001, tags: {weft.io/service: c}}]}}",
            ),
            "spec.networking.outbound[1].port",
            "duplicate outbound 127.0.0.1:10001",
        ),
        // ZoneIngress and ZoneEgress
        (
            "advertised address without port",
            global_doc(
                "ZoneIngress",
                "{networking: {address: 10.0.0.5, port: 10001, advertisedAddress: 203.0.113.1}}",
            ),
            "spec.networking.advertisedPort",
            "required with advertisedAddress (set both, or neither)",
        ),
        (
            "available service without service tag",
            global_doc(
                "ZoneIngress",
                "{networking: {address: 10.0.0.5, port: 10001}, availableServices: [{mesh: default, tags: {}, instances: 1}]}",
            ),
            "spec.availableServices[0].tags",
            "missing weft.io/service",
        ),
        (
            "egress admin port",
            global_doc(
                "ZoneEgress",
                "{networking: {address: 10.0.0.6, port: 10002, admin: {port: 10002}}}",
            ),
            "spec.networking.admin.port",
            "already the egress port",
        ),
        // MeshService and MeshExternalService
        (
            "service without ports",
            doc(
                "MeshService",
                "{selector: {dataplaneTags: {weft.io/service: backend}}}",
            ),
            "spec.ports",
            "at least one port required",
        ),
        (
            "service without selector tags",
            doc(
                "MeshService",
                "{selector: {dataplaneTags: {}}, ports: [{port: 80}]}",
            ),
            "spec.selector.dataplaneTags",
            "required: the tags that select this service's dataplanes",
        ),
        (
            "duplicate service port",
            doc(
                "MeshService",
                "{selector: {dataplaneTags: {a: b}}, ports: [{port: 80}, {port: 80, targetPort: 8080}]}",
            ),
            "spec.ports[1].port",
            "duplicate port 80 (ports[0] has it too)",
        ),
        (
            "service app protocol",
            doc(
                "MeshService",
                "{selector: {dataplaneTags: {a: b}}, ports: [{port: 80, appProtocol: tls}]}",
            ),
            "spec.ports[0].appProtocol",
            "unknown variant `tls`",
        ),
        (
            "service identity type",
            doc(
                "MeshService",
                "{selector: {dataplaneTags: {a: b}}, ports: [{port: 80}], identities: [{type: SpiffeID, value: x}]}",
            ),
            "spec.identities[0].type",
            "unknown variant `SpiffeID`, expected `ServiceTag`",
        ),
        (
            "external service without endpoints",
            doc(
                "MeshExternalService",
                "{match: {type: HostnameGenerator, port: 443, protocol: tls}, endpoints: []}",
            ),
            "spec.endpoints",
            "at least one endpoint required",
        ),
        (
            "external service match type",
            doc(
                "MeshExternalService",
                "{match: {type: Hostname, port: 443, protocol: tls}, endpoints: [{address: a.example.com, port: 443}]}",
            ),
            "spec.match.type",
            "unknown variant `Hostname`, expected `HostnameGenerator`",
        ),
        (
            "external service protocol",
            doc(
                "MeshExternalService",
                "{match: {type: HostnameGenerator, port: 443, protocol: udp}, endpoints: [{address: a.example.com, port: 443}]}",
            ),
            "spec.match.protocol",
            "unknown variant `udp`, expected one of `tcp`, `http`, `http2`, `grpc`, `tls`",
        ),
        (
            "verification while tls is off",
            doc(
                "MeshExternalService",
                "{match: {type: HostnameGenerator, port: 443, protocol: http}, endpoints: [{address: a.example.com, port: 443}], tls: {enabled: false, verification: {mode: SkipCA}}}",
            ),
            "spec.tls.verification",
            "has no effect while tls.enabled is false (set enabled: true, or remove it)",
        ),
        (
            "verification mode",
            doc(
                "MeshExternalService",
                "{match: {type: HostnameGenerator, port: 443, protocol: http}, endpoints: [{address: a.example.com, port: 443}], tls: {enabled: true, verification: {mode: Skip}}}",
            ),
            "spec.tls.verification.mode",
            "unknown variant `Skip`, expected one of `Secured`, `SkipSAN`, `SkipCA`, `SkipAll`",
        ),
        // MeshTrafficPermission
        (
            "permission action",
            doc("MeshTrafficPermission", &from("{action: Permit}")),
            "spec.from[0].default.action",
            "unknown variant `Permit`, expected one of `Allow`, `Deny`, `AllowWithShadowDeny`",
        ),
        (
            "permission without action",
            doc("MeshTrafficPermission", &from("{}")),
            "spec.from[0].default",
            "missing field `action`",
        ),
        // MeshTimeout
        (
            "empty timeout configuration",
            doc("MeshTimeout", &to("{}")),
            "spec.to[0].default",
            "empty: set at least one of connectionTimeout, idleTimeout, http",
        ),
        // MeshRetry
        (
            "retry back-off upside down",
            doc(
                "MeshRetry",
                &to("{http: {backOff: {baseInterval: 2s, maxInterval: 1s}}}"),
            ),
            "spec.to[0].default.http.backOff.maxInterval",
            "must be at least baseInterval (2s)",
        ),
        (
            "retry condition",
            doc("MeshRetry", &to("{http: {retryOn: [5xx, Sometimes]}}")),
            "spec.to[0].default.http.retryOn[1]",
            r#"invalid retry condition "Sometimes" (expected an HTTP status such as 503, or one of All, 5xx,"#,
        ),
        (
            "grpc retry condition",
            doc("MeshRetry", &to("{grpc: {retryOn: [NotFound]}}")),
            "spec.to[0].default.grpc.retryOn[0]",
            "unknown variant `NotFound`",
        ),
        (
            "retry zero timeout",
            doc("MeshRetry", &to("{http: {perTryTimeout: 0s}}")),
            "spec.to[0].default.http.perTryTimeout",
            "must be greater than 0",
        ),
        (
            "retry has no from",
            doc("MeshRetry", &from("{tcp: {maxConnectAttempt: 2}}")),
            "spec.from",
            "not allowed for this policy (use to instead)",
        ),
        // MeshCircuitBreaker
        (
            "ejection percent",
            doc(
                "MeshCircuitBreaker",
                &to(
                    "{outlierDetection: {maxEjectionPercent: 150, detectors: {totalFailures: {consecutive: 5}}}}",
                ),
            ),
            "spec.to[0].default.outlierDetection.maxEjectionPercent",
            "must be 0-100 (a percentage), got 150",
        ),
        (
            "outlier detection without detectors",
            doc(
                "MeshCircuitBreaker",
                &to("{outlierDetection: {interval: 5s}}"),
            ),
            "spec.to[0].default.outlierDetection.detectors",
            "required unless disabled is true",
        ),
        (
            "zero consecutive failures",
            doc(
                "MeshCircuitBreaker",
                &to("{outlierDetection: {detectors: {gatewayFailures: {consecutive: 0}}}}"),
            ),
            "spec.to[0].default.outlierDetection.detectors.gatewayFailures.consecutive",
            "must be greater than 0",
        ),
        (
            "circuit breaker sources are the whole mesh",
            doc(
                "MeshCircuitBreaker",
                "{from: [{targetRef: {kind: MeshService, name: a}, default: {connectionLimits: {maxConnections: 1}}}]}",
            ),
            "spec.from[0].targetRef.kind",
            "MeshService is not allowed here (allowed: Mesh)",
        ),
        // MeshHealthCheck
        (
            "health check path",
            doc("MeshHealthCheck", &to("{http: {path: health}}")),
            "spec.to[0].default.http.path",
            r#"must start with / (e.g. /health), got "health""#,
        ),
        (
            "health check status",
            doc(
                "MeshHealthCheck",
                &to("{http: {expectedStatuses: [200, 700]}}"),
            ),
            "spec.to[0].default.http.expectedStatuses[1]",
            "invalid HTTP status 700 (expected 100-599, e.g. 503)",
        ),
        (
            "health check destinations",
            doc(
                "MeshHealthCheck",
                "{to: [{targetRef: {kind: MeshExternalService, name: e}, default: {interval: 1s}}]}",
            ),
            "spec.to[0].targetRef.kind",
            "MeshExternalService is not allowed here (allowed: Mesh, MeshService)",
        ),
        // MeshRateLimit
        (
            "rate limit interval",
            doc(
                "MeshRateLimit",
                &from("{local: {http: {requestRate: {num: 10, interval: 10ms}}}}"),
            ),
            "spec.from[0].default.local.http.requestRate.interval",
            "must be at least 50ms, got 10ms",
        ),
        (
            "rate limit zero",
            doc(
                "MeshRateLimit",
                &from("{local: {tcp: {connectionRate: {num: 0, interval: 1s}}}}"),
            ),
            "spec.from[0].default.local.tcp.connectionRate.num",
            "must be greater than 0",
        ),
        (
            "rate limit without local",
            doc("MeshRateLimit", &from("{}")),
            "spec.from[0].default.local",
            "required (e.g. local:",
        ),
        (
            "rate limit status",
            doc(
                "MeshRateLimit",
                &from("{local: {http: {onRateLimit: {status: 42}}}}"),
            ),
            "spec.from[0].default.local.http.onRateLimit.status",
            "invalid HTTP status 42",
        ),
        // MeshFaultInjection
        (
            "fault percentage",
            doc(
                "MeshFaultInjection",
                &from("{http: [{abort: {httpStatus: 503, percentage: 150}}]}"),
            ),
            "spec.from[0].default.http[0].abort.percentage",
            "invalid percentage 150 (expected a number from 0 to 100, e.g. 50 or 12.5)",
        ),
        (
            "fault bandwidth",
            doc(
                "MeshFaultInjection",
                &from("{http: [{responseBandwidth: {limit: fast, percentage: 1}}]}"),
            ),
            "spec.from[0].default.http[0].responseBandwidth.limit",
            r#"invalid bandwidth "fast""#,
        ),
        (
            "empty fault",
            doc("MeshFaultInjection", &from("{http: [{}]}")),
            "spec.from[0].default.http[0]",
            "empty: set at least one of abort, delay, responseBandwidth",
        ),
        // MeshLoadBalancingStrategy
        (
            "load balancer settings for another type",
            doc(
                "MeshLoadBalancingStrategy",
                &to("{loadBalancer: {type: RingHash, maglev: {tableSize: 65537}}}"),
            ),
            "spec.to[0].default.loadBalancer.maglev",
            "not allowed with type RingHash (remove it, or change type)",
        ),
        (
            "maglev table size",
            doc(
                "MeshLoadBalancingStrategy",
                &to("{loadBalancer: {type: Maglev, maglev: {tableSize: 65536}}}"),
            ),
            "spec.to[0].default.loadBalancer.maglev.tableSize",
            "must be a prime number",
        ),
        (
            "least request choice count",
            doc(
                "MeshLoadBalancingStrategy",
                &to("{loadBalancer: {type: LeastRequest, leastRequest: {choiceCount: 1}}}"),
            ),
            "spec.to[0].default.loadBalancer.leastRequest.choiceCount",
            "must be at least 2, got 1",
        ),
        (
            "hash policy without its settings",
            doc(
                "MeshLoadBalancingStrategy",
                &to("{loadBalancer: {type: RingHash, ringHash: {hashPolicies: [{type: Header}]}}}"),
            ),
            "spec.to[0].default.loadBalancer.ringHash.hashPolicies[0].header",
            "required with type Header",
        ),
        (
            "failover to listed zones without zones",
            doc(
                "MeshLoadBalancingStrategy",
                &to("{localityAwareness: {crossZone: {failover: [{to: {type: Only}}]}}}"),
            ),
            "spec.to[0].default.localityAwareness.crossZone.failover[0].to.zones",
            "required with type Only",
        ),
        (
            "load balancer type",
            doc(
                "MeshLoadBalancingStrategy",
                &to("{loadBalancer: {type: Fastest}}"),
            ),
            "spec.to[0].default.loadBalancer.type",
            "unknown variant `Fastest`, expected one of `RoundRobin`, `LeastRequest`, `RingHash`, `Random`, `Maglev`",
        ),
        // MeshHTTPRoute
        (
            "route destination kind",
            doc(
                "MeshHTTPRoute",
                "{to: [{targetRef: {kind: Mesh}, rules: [{matches: [{path: {type: PathPrefix, value: /}}], default: {}}]}]}",
            ),
            "spec.to[0].targetRef.kind",
            "Mesh is not allowed here (allowed: MeshService, MeshExternalService)",
        ),
        (
            "route path not absolute",
            doc(
                "MeshHTTPRoute",
                &route("[{matches: [{path: {type: Exact, value: api}}], default: {}}]"),
            ),
            "spec.to[0].rules[0].matches[0].path.value",
            "must be an absolute path starting with /",
        ),
        (
            "route prefix with trailing slash",
            doc(
                "MeshHTTPRoute",
                &route("[{matches: [{path: {type: PathPrefix, value: /api/}}], default: {}}]"),
            ),
            "spec.to[0].rules[0].matches[0].path.value",
            "remove the trailing /",
        ),
        (
            "route method",
            doc(
                "MeshHTTPRoute",
                &route("[{matches: [{method: get}], default: {}}]"),
            ),
            "spec.to[0].rules[0].matches[0].method",
            "unknown variant `get`",
        ),
        (
            "route header match value",
            doc(
                "MeshHTTPRoute",
                &route(
                    "[{matches: [{headers: [{type: Present, name: x-a, value: b}]}], default: {}}]",
                ),
            ),
            "spec.to[0].rules[0].matches[0].headers[0].value",
            "not allowed with type Present (remove it)",
        ),
        (
            "route rule without matches",
            doc("MeshHTTPRoute", &route("[{default: {}}]")),
            "spec.to[0].rules[0].matches",
            "at least one match required",
        ),
        (
            "route without rules",
            doc("MeshHTTPRoute", &route("[]")),
            "spec.to[0].rules",
            "at least one rule required",
        ),
        (
            "route without destinations",
            doc("MeshHTTPRoute", "{}"),
            "spec.to",
            "at least one destination required",
        ),
        (
            "route backend kind",
            doc(
                "MeshHTTPRoute",
                &route(
                    "[{matches: [{path: {type: PathPrefix, value: /}}], default: {backendRefs: [{kind: Mesh}]}}]",
                ),
            ),
            "spec.to[0].rules[0].default.backendRefs[0].kind",
            "Mesh is not allowed here (allowed: MeshService, MeshServiceSubset, MeshExternalService)",
        ),
        (
            "route filter settings missing",
            doc(
                "MeshHTTPRoute",
                &route(
                    "[{matches: [{path: {type: PathPrefix, value: /}}], default: {filters: [{type: RequestRedirect}]}}]",
                ),
            ),
            "spec.to[0].rules[0].default.filters[0].requestRedirect",
            "required with type RequestRedirect",
        ),
        (
            "route prefix rewrite without prefix match",
            doc(
                "MeshHTTPRoute",
                &route(
                    "[{matches: [{path: {type: Exact, value: /a}}], default: {filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}}]",
                ),
            ),
            "spec.to[0].rules[0].default.filters[0].urlRewrite.path.type",
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix path match",
        ),
        (
            "route redirect status",
            doc(
                "MeshHTTPRoute",
                &route(
                    "[{matches: [{path: {type: PathPrefix, value: /}}], default: {filters: [{type: RequestRedirect, requestRedirect: {statusCode: 200}}]}}]",
                ),
            ),
            "spec.to[0].rules[0].default.filters[0].requestRedirect.statusCode",
            "invalid redirect status 200 (expected 301, 302, 303, 307 or 308)",
        ),
        (
            "route header changed twice",
            doc(
                "MeshHTTPRoute",
                &route(
                    "[{matches: [{path: {type: PathPrefix, value: /}}], default: {filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: b}], remove: [X-A]}}]}}]",
                ),
            ),
            "spec.to[0].rules[0].default.filters[0].requestHeaderModifier.remove[0]",
            "is already changed by spec.to[0].rules[0].default.filters[0].requestHeaderModifier.set[0].name",
        ),
        (
            "route mirror backend",
            doc(
                "MeshHTTPRoute",
                &route(
                    "[{matches: [{path: {type: PathPrefix, value: /}}], default: {filters: [{type: RequestMirror, requestMirror: {backendRef: {kind: MeshExternalService, name: e}}}]}}]",
                ),
            ),
            "spec.to[0].rules[0].default.filters[0].requestMirror.backendRef.kind",
            "MeshExternalService is not allowed here (allowed: MeshService, MeshServiceSubset)",
        ),
        // MeshTCPRoute
        (
            "tcp route without backends",
            doc("MeshTCPRoute", &route("[{default: {}}]")),
            "spec.to[0].rules[0].default.backendRefs",
            "at least one backend required",
        ),
        (
            "tcp route with two rules",
            doc(
                "MeshTCPRoute",
                &route(
                    "[{default: {backendRefs: [{kind: MeshService, name: a}]}}, {default: {backendRefs: [{kind: MeshService, name: b}]}}]",
                ),
            ),
            "spec.to[0].rules",
            "one rule per destination (got 2; merge them)",
        ),
        (
            "tcp route matches nothing",
            doc(
                "MeshTCPRoute",
                &route("[{matches: [], default: {backendRefs: [{kind: MeshService, name: a}]}}]"),
            ),
            "spec.to[0].rules[0].matches",
            "unknown field `matches`, expected `default`",
        ),
        // MeshAccessLog
        (
            "access log backend with two kinds",
            doc(
                "MeshAccessLog",
                &to("{backends: [{file: {path: /dev/stdout}, tcp: {address: 'l:1'}}]}"),
            ),
            "spec.to[0].default.backends[0]",
            "set exactly one of file, tcp, openTelemetry (found file and tcp)",
        ),
        (
            "access log relative path",
            doc(
                "MeshAccessLog",
                &to("{backends: [{file: {path: logs/access.log}}]}"),
            ),
            "spec.to[0].default.backends[0].file.path",
            "must be an absolute path",
        ),
        (
            "access log tcp address",
            doc(
                "MeshAccessLog",
                &to("{backends: [{tcp: {address: logstash}}]}"),
            ),
            "spec.to[0].default.backends[0].tcp.address",
            r#"invalid address "logstash" (expected host:port"#,
        ),
        (
            "access log format",
            doc(
                "MeshAccessLog",
                &to("{backends: [{file: {path: /a, format: {type: Json}}}]}"),
            ),
            "spec.to[0].default.backends[0].file.format.json",
            "required with type Json",
        ),
        (
            "access log without backends",
            doc("MeshAccessLog", &to("{}")),
            "spec.to[0].default.backends",
            "at least one entry required",
        ),
        // MeshTrace
        (
            "trace backends",
            doc(
                "MeshTrace",
                "{default: {backends: [{zipkin: {url: 'http://a:9411'}}, {zipkin: {url: 'http://b:9411'}}]}}",
            ),
            "spec.default.backends",
            "at most one backend allowed, got 2",
        ),
        (
            "zipkin url",
            doc(
                "MeshTrace",
                "{default: {backends: [{zipkin: {url: 'zipkin:9411'}}]}}",
            ),
            "spec.default.backends[0].zipkin.url",
            r#"invalid URL "zipkin:9411" (expected http:// or https://"#,
        ),
        (
            "trace sampling",
            doc("MeshTrace", "{default: {sampling: {random: 101}}}"),
            "spec.default.sampling.random",
            "invalid percentage 101",
        ),
        (
            "trace tag source",
            doc(
                "MeshTrace",
                "{default: {tags: [{name: t, literal: a, header: {name: x-a}}]}}",
            ),
            "spec.default.tags[0]",
            "set exactly one of literal, header (found literal and header)",
        ),
        // MeshMetric
        (
            "metric backend settings missing",
            doc("MeshMetric", "{default: {backends: [{type: Prometheus}]}}"),
            "spec.default.backends[0].prometheus",
            "required with type Prometheus",
        ),
        (
            "metric path",
            doc(
                "MeshMetric",
                "{default: {backends: [{type: Prometheus, prometheus: {port: 5670, path: metrics}}]}}",
            ),
            "spec.default.backends[0].prometheus.path",
            "must start with /",
        ),
        (
            "metric ports",
            doc(
                "MeshMetric",
                "{default: {backends: [{type: Prometheus, prometheus: {port: 5670, path: /a}}, {type: Prometheus, prometheus: {port: 5670, path: /b}}]}}",
            ),
            "spec.default.backends[1].prometheus.port",
            "port 5670 is already used by another Prometheus backend",
        ),
        (
            "metric profile",
            doc(
                "MeshMetric",
                "{default: {sidecar: {profiles: {appendProfiles: [{name: Everything}]}}}}",
            ),
            "spec.default.sidecar.profiles.appendProfiles[0].name",
            "unknown variant `Everything`",
        ),
    ]
}

#[test]
fn each_kind_checks_its_fields() {
    let mut failures = Vec::new();
    for (what, text, field, fragment) in cases() {
        let result = std::panic::catch_unwind(|| expect(&text, field, fragment));
        if let Err(e) = result {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            failures.push(format!("{what}: {msg}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_kind_has_a_failing_case() {
    let kinds: std::collections::BTreeSet<String> = cases()
        .iter()
        .map(|c| {
            c.1.lines()
                .next()
                .unwrap()
                .trim_start_matches("type: ")
                .to_string()
        })
        .collect();
    for k in weft_core::Kind::ALL {
        assert!(kinds.contains(k.name()), "no bad-input case for {k}");
    }
}
