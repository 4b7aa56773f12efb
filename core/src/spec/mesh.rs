//! Specs of the global-scoped kinds owned by global: `Mesh` and `Zone`.

use serde::{Deserialize, Serialize};

use super::Spec;
use crate::validate::{Duration, Invalid, join};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_services: Option<MeshServices>,
    /// Deny traffic that no MeshTrafficPermission allows (safe default: true when mTLS is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_deny: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    /// Name of the backend in `backends` that is in use; mTLS is off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_backend: Option<String>,
    #[serde(default)]
    pub backends: Vec<CaBackend>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaBackend {
    pub name: crate::validate::Name,
    #[serde(rename = "type")]
    pub kind: CaType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_cert: Option<DpCert>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaType {
    #[serde(rename = "builtin")]
    Builtin,
    #[serde(rename = "provided")]
    Provided,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DpCert {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rotation {
    pub expiration: Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Routing {
    /// Send all cross-zone and external traffic through the zone egress: proxies get their
    /// zone's egress as the endpoint of other zones' services, and the egress passes those
    /// connections, still encrypted end to end, to the other zone's ingress. Needs mTLS (the
    /// egress routes by the SNI of the proxies' mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_egress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_aware_load_balancing: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshServices {
    pub mode: MeshServicesMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshServicesMode {
    #[default]
    Disabled,
    Everywhere,
    Exclusive,
}

impl Spec for MeshSpec {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        let mtls_on = self
            .mtls
            .as_ref()
            .is_some_and(|m| m.enabled_backend.is_some());
        if self.routing.as_ref().and_then(|r| r.zone_egress) == Some(true) && !mtls_on {
            errs.add(
                join(&join(path, "routing"), "zoneEgress"),
                "true needs mTLS: the zone egress routes cross-zone traffic by the SNI of the proxies' mTLS (set mtls.enabledBackend, or remove routing.zoneEgress)",
            );
        }
        if let Some(mtls) = &self.mtls {
            let p = join(path, "mtls");
            let mut seen = std::collections::HashSet::new();
            for (i, b) in mtls.backends.iter().enumerate() {
                if !seen.insert(&b.name) {
                    errs.add(
                        format!("{p}.backends[{i}].name"),
                        format!("duplicate backend name {:?}", b.name.0),
                    );
                }
            }
            if let Some(enabled) = &mtls.enabled_backend
                && !mtls.backends.iter().any(|b| &b.name.0 == enabled)
            {
                errs.add(
                    join(&p, "enabledBackend"),
                    format!(
                        "no backend named {enabled:?} in mtls.backends (add it, or fix the name)"
                    ),
                );
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneSpec {
    /// A disabled zone is cut off from global.
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn yes() -> bool {
    true
}

impl Spec for ZoneSpec {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `(field, message)` of every error of `spec`.
    fn errors(spec: serde_json::Value) -> Vec<(String, String)> {
        let spec: MeshSpec = serde_json::from_value(spec).expect("parses");
        let mut errs = Invalid::default();
        spec.validate("spec", &mut errs);
        errs.errors
            .into_iter()
            .map(|e| (e.field, e.message))
            .collect()
    }

    fn mtls() -> serde_json::Value {
        json!({"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]})
    }

    #[test]
    fn zone_egress_routing_needs_mtls() {
        let spec: MeshSpec =
            serde_json::from_value(json!({"mtls": mtls(), "routing": {"zoneEgress": true}}))
                .unwrap();
        assert_eq!(spec.routing.and_then(|r| r.zone_egress), Some(true));
        assert_eq!(
            errors(json!({"mtls": mtls(), "routing": {"zoneEgress": true}})),
            []
        );
        let off = errors(json!({"routing": {"zoneEgress": true}}));
        assert_eq!(off.len(), 1, "{off:?}");
        assert_eq!(off[0].0, "spec.routing.zoneEgress");
        assert!(
            off[0].1.contains("needs mTLS") && off[0].1.contains("mtls.enabledBackend"),
            "{off:?}"
        );
        // Backends without an enabled one: mTLS is off.
        let mut disabled = mtls();
        disabled.as_object_mut().unwrap().remove("enabledBackend");
        let off = errors(json!({"mtls": disabled, "routing": {"zoneEgress": true}}));
        assert_eq!(off.len(), 1, "{off:?}");
        assert_eq!(off[0].0, "spec.routing.zoneEgress");
        // false, or no routing, needs nothing.
        assert_eq!(errors(json!({"routing": {"zoneEgress": false}})), []);
        assert_eq!(errors(json!({})), []);
    }
}
