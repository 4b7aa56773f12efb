//! Resources to load: a realistic document of every kind global accepts, numbered.

use weft_core::{Kind, Owner};

/// The spec body (YAML, indented under `spec:`) of resource number `i` of `kind`.
fn spec(kind: Kind, i: usize) -> String {
    let svc = format!("svc-{i}");
    match kind {
        Kind::Mesh => {
            "mtls:\n    enabledBackend: ca-1\n    backends:\n      - {name: ca-1, type: builtin}\n"
                .to_string()
        }
        Kind::Zone => format!(
            "enabled: {}\n  description: zone number {i}\n",
            !i.is_multiple_of(7)
        ),
        Kind::MeshExternalService => format!(
            "match: {{type: HostnameGenerator, port: 443, protocol: tls}}\n  endpoints:\n    - {{address: ext-{i}.example.com, port: 443}}\n  tls: {{enabled: true}}\n"
        ),
        Kind::MeshTrafficPermission => format!(
            "targetRef: {{kind: MeshService, name: {svc}}}\n  from:\n    - targetRef: {{kind: MeshSubset, tags: {{team: t{i}}}}}\n      default: {{action: Allow}}\n"
        ),
        Kind::MeshTimeout => format!(
            "targetRef: {{kind: Mesh}}\n  to:\n    - targetRef: {{kind: MeshService, name: {svc}}}\n      default: {{connectionTimeout: {}s, http: {{requestTimeout: 5s}}}}\n",
            1 + i % 9
        ),
        Kind::MeshRetry => format!(
            "targetRef: {{kind: Mesh}}\n  to:\n    - targetRef: {{kind: MeshService, name: {svc}}}\n      default:\n        http: {{numRetries: {}, perTryTimeout: 1s, backOff: {{baseInterval: 50ms, maxInterval: 1s}}}}\n",
            i % 5
        ),
        Kind::MeshCircuitBreaker => format!(
            "targetRef: {{kind: Mesh}}\n  to:\n    - targetRef: {{kind: MeshService, name: {svc}}}\n      default:\n        connectionLimits: {{maxConnections: {}}}\n        outlierDetection: {{interval: 5s, baseEjectionTime: 30s, detectors: {{totalFailures: {{consecutive: 5}}}}}}\n",
            100 + i
        ),
        Kind::MeshHealthCheck => format!(
            "targetRef: {{kind: Mesh}}\n  to:\n    - targetRef: {{kind: MeshService, name: {svc}}}\n      default: {{interval: 10s, timeout: 2s, unhealthyThreshold: 3, healthyThreshold: 1, http: {{path: /health-{i}}}}}\n"
        ),
        Kind::MeshRateLimit => format!(
            "targetRef: {{kind: MeshService, name: {svc}}}\n  from:\n    - targetRef: {{kind: Mesh}}\n      default:\n        local:\n          http: {{requestRate: {{num: {}, interval: 1s}}}}\n",
            10 + i
        ),
        Kind::MeshFaultInjection => format!(
            "targetRef: {{kind: MeshService, name: {svc}}}\n  from:\n    - targetRef: {{kind: Mesh}}\n      default:\n        http:\n          - abort: {{httpStatus: 503, percentage: {}}}\n",
            i % 100
        ),
        Kind::MeshLoadBalancingStrategy => format!(
            "targetRef: {{kind: Mesh}}\n  to:\n    - targetRef: {{kind: MeshService, name: {svc}}}\n      default:\n        localityAwareness: {{disabled: {}}}\n        loadBalancer: {{type: LeastRequest}}\n",
            i.is_multiple_of(2)
        ),
        Kind::MeshHTTPRoute => format!(
            "targetRef: {{kind: Mesh}}\n  to:\n    - targetRef: {{kind: MeshService, name: {svc}}}\n      rules:\n        - matches:\n            - path: {{type: PathPrefix, value: /v{i}}}\n          default:\n            backendRefs:\n              - {{kind: MeshService, name: {svc}-v2, weight: 100}}\n"
        ),
        Kind::MeshTCPRoute => format!(
            "targetRef: {{kind: Mesh}}\n  to:\n    - targetRef: {{kind: MeshService, name: {svc}}}\n      rules:\n        - default:\n            backendRefs:\n              - {{kind: MeshService, name: {svc}-tcp, weight: 1}}\n"
        ),
        Kind::MeshAccessLog => format!(
            "targetRef: {{kind: Mesh}}\n  to:\n    - targetRef: {{kind: MeshService, name: {svc}}}\n      default:\n        backends:\n          - file: {{path: /var/log/access-{i}.log}}\n"
        ),
        Kind::MeshTrace => format!(
            "targetRef: {{kind: Mesh}}\n  default:\n    backends:\n      - zipkin: {{url: 'http://zipkin-{i}:9411/api/v2/spans'}}\n    sampling: {{overall: {}}}\n",
            i % 100
        ),
        Kind::MeshMetric => format!(
            "targetRef: {{kind: Mesh}}\n  default:\n    backends:\n      - type: Prometheus\n        prometheus: {{port: {}, path: /metrics}}\n",
            5670 + i % 100
        ),
        other => unreachable!("{other} is zone-owned"),
    }
}

/// The kinds global accepts writes for.
pub fn global_kinds() -> Vec<Kind> {
    Kind::ALL
        .iter()
        .copied()
        .filter(|k| k.owner() == Owner::Global)
        .collect()
}

/// One document (YAML, no leading `---`).
pub fn document(kind: Kind, i: usize, mesh: &str) -> String {
    let name = format!("{}-{i}", kind.name().to_lowercase());
    let mesh_line = match kind.scope() {
        weft_core::Scope::Mesh => format!("mesh: {mesh}\n"),
        weft_core::Scope::Global => String::new(),
    };
    format!(
        "type: {kind}\nname: {name}\n{mesh_line}labels:\n  fixture: \"yes\"\n  n: \"{i}\"\nspec:\n  {}",
        spec(kind, i)
    )
}

/// `n` resources of every kind global accepts, in `mesh`, as one multi-document YAML stream.
pub fn every_kind(n: usize, mesh: &str) -> String {
    let mut docs = Vec::new();
    for kind in global_kinds() {
        for i in 0..n {
            docs.push(document(kind, i, mesh));
        }
    }
    docs.join("---\n")
}

/// `n` MeshTimeouts in `mesh`: the benchmark's policy file.
pub fn timeouts(n: usize, mesh: &str) -> String {
    (0..n)
        .map(|i| document(Kind::MeshTimeout, i, mesh))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_fixture_document_is_valid() {
        let yaml = super::every_kind(3, "default");
        let parsed = weft_core::document::parse(&yaml).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.len(), 3 * super::global_kinds().len());
    }
}
