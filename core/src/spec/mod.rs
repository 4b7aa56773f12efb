//! Typed specs for every kind, and `parse`: check a spec against its kind's type and return it
//! in canonical form. Unknown fields are rejected everywhere (`deny_unknown_fields`).
//!
//! Layout: `mesh` (Mesh, Zone), `dataplane` (Dataplane, ZoneIngress, ZoneEgress), `service`
//! (MeshService, MeshExternalService), `policy` (the shared policy shape and its section
//! table), `policies` (each policy's configuration), `route` (MeshHTTPRoute, MeshTCPRoute),
//! `target_ref`, and `fields` (value types and checks the others share).

pub mod dataplane;
pub mod fields;
pub mod mesh;
pub mod policies;
pub mod policy;
pub mod route;
pub mod service;
pub mod target_ref;

pub use dataplane::{DataplaneSpec, ZoneEgressSpec, ZoneIngressSpec};
pub use fields::SERVICE_TAG;
pub use mesh::{MeshSpec, ZoneSpec};
pub use policies::{
    MeshAccessLogConf, MeshCircuitBreakerConf, MeshFaultInjectionConf, MeshHealthCheckConf,
    MeshLoadBalancingStrategyConf, MeshMetricConf, MeshRateLimitConf, MeshRetryConf,
    MeshTimeoutConf, MeshTraceConf, MeshTrafficPermissionConf,
};
pub use policy::{Conf, From, PolicySpec, Rule, Sections, To};
pub use route::{MeshHttpRouteSpec, MeshTcpRouteSpec};
pub use service::{MeshExternalServiceSpec, MeshServiceSpec};
pub use target_ref::{TargetKind, TargetRef};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::kind::Kind;
use crate::validate::{self, Invalid};

/// A kind's spec. `validate` adds what serde cannot express (cross-field rules, allowed
/// targetRef kinds); `path` is where the spec sits (`spec`).
pub trait Spec: DeserializeOwned + Serialize {
    fn validate(&self, _path: &str, _errs: &mut Invalid) {}
}

fn typed<T: Spec>(value: Value) -> Result<Value, Invalid> {
    let spec: T = validate::from_value("spec", value)?;
    let mut errs = Invalid::default();
    spec.validate("spec", &mut errs);
    errs.into_result()?;
    Ok(serde_json::to_value(&spec).expect("specs serialize"))
}

/// Parse `value` as the spec of `kind`, returning it in canonical form.
pub fn parse(kind: Kind, value: Value) -> Result<Value, Invalid> {
    if !value.is_object() {
        return Err(Invalid::one(
            "spec",
            format!("expected an object, got {value}"),
        ));
    }
    // No catch-all: a new kind does not compile until it has a typed spec.
    match kind {
        Kind::Mesh => typed::<MeshSpec>(value),
        Kind::Zone => typed::<ZoneSpec>(value),
        Kind::Dataplane => typed::<DataplaneSpec>(value),
        Kind::ZoneIngress => typed::<ZoneIngressSpec>(value),
        Kind::ZoneEgress => typed::<ZoneEgressSpec>(value),
        Kind::MeshService => typed::<MeshServiceSpec>(value),
        Kind::MeshExternalService => typed::<MeshExternalServiceSpec>(value),
        Kind::MeshTrafficPermission => typed::<PolicySpec<MeshTrafficPermissionConf>>(value),
        Kind::MeshTimeout => typed::<PolicySpec<MeshTimeoutConf>>(value),
        Kind::MeshRetry => typed::<PolicySpec<MeshRetryConf>>(value),
        Kind::MeshCircuitBreaker => typed::<PolicySpec<MeshCircuitBreakerConf>>(value),
        Kind::MeshHealthCheck => typed::<PolicySpec<MeshHealthCheckConf>>(value),
        Kind::MeshRateLimit => typed::<PolicySpec<MeshRateLimitConf>>(value),
        Kind::MeshFaultInjection => typed::<PolicySpec<MeshFaultInjectionConf>>(value),
        Kind::MeshLoadBalancingStrategy => {
            typed::<PolicySpec<MeshLoadBalancingStrategyConf>>(value)
        }
        Kind::MeshHTTPRoute => typed::<MeshHttpRouteSpec>(value),
        Kind::MeshTCPRoute => typed::<MeshTcpRouteSpec>(value),
        Kind::MeshAccessLog => typed::<PolicySpec<MeshAccessLogConf>>(value),
        Kind::MeshTrace => typed::<PolicySpec<MeshTraceConf>>(value),
        Kind::MeshMetric => typed::<PolicySpec<MeshMetricConf>>(value),
    }
}
