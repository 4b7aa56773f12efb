//! Specs of services: `MeshService` (a service in the mesh, selecting its dataplanes) and
//! `MeshExternalService` (a destination outside the mesh, reached through the egress).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::Spec;
use super::fields::{Address, Protocol, check_hostname, check_tags, index};
use crate::validate::{Invalid, Name, Port, check_dns_label, join};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshServiceSpec {
    pub selector: ServiceSelector,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<Identity>,
    /// Maintained by the zone the service runs in (users leave it out): this is the
    /// per-service availability other zones route by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MeshServiceStatus>,
}

/// What a zone reports about one of its services.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshServiceStatus {
    /// Online instances (dataplanes with a ready inbound for the service) in the zone.
    pub instances: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSelector {
    /// The dataplanes whose inbounds carry all these tags implement the service.
    #[serde(default)]
    pub dataplane_tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// The port clients call.
    pub port: Port,
    /// The dataplane inbound port; `port` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<Port>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<Protocol>,
    /// For `sectionName` in targetRefs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
}

/// An identity the service's workloads present.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identity {
    #[serde(rename = "type")]
    pub kind: IdentityType,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IdentityType {
    /// The value of the workloads' `weft.io/service` tag.
    ServiceTag,
}

impl Spec for MeshServiceSpec {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        let tags_path = join(path, "selector.dataplaneTags");
        if self.selector.dataplane_tags.is_empty() {
            errs.add(&tags_path, "required: the tags that select this service's dataplanes (e.g. {weft.io/service: backend})");
        }
        check_tags(&tags_path, &self.selector.dataplane_tags, errs);
        if self.ports.is_empty() {
            errs.add(join(path, "ports"), "at least one port required (e.g. ports: [{port: 80, targetPort: 8080, appProtocol: http}])");
        }
        let mut ports = HashMap::new();
        let mut names = HashMap::new();
        for (i, p) in self.ports.iter().enumerate() {
            let at = index(path, "ports", i);
            if let Some(first) = ports.insert(p.port, i) {
                errs.add(
                    join(&at, "port"),
                    format!("duplicate port {} (ports[{first}] has it too)", p.port.0),
                );
            }
            if let Some(name) = &p.name
                && let Some(first) = names.insert(name, i)
            {
                errs.add(
                    join(&at, "name"),
                    format!(
                        "duplicate port name {:?} (ports[{first}] has it too)",
                        name.0
                    ),
                );
            }
        }
        for (i, id) in self.identities.iter().enumerate() {
            let at = join(&index(path, "identities", i), "value");
            // The weft.io/service value of the workloads, so a DNS label.
            if let Err(m) = check_dns_label(&id.value) {
                errs.add(at, m);
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshExternalServiceSpec {
    /// What traffic the mesh sends here: a generated hostname and this port.
    #[serde(rename = "match")]
    pub matcher: ExternalMatch,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ExternalTls>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalMatch {
    #[serde(rename = "type")]
    pub kind: MatchType,
    pub port: Port,
    pub protocol: ExternalProtocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MatchType {
    /// Match the hostname a HostnameGenerator gives the service.
    HostnameGenerator,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalProtocol {
    Tcp,
    Http,
    Http2,
    Grpc,
    Tls,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub address: Address,
    pub port: Port,
}

/// TLS the sidecar (or egress) originates to the external service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalTls {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Verification {
    /// SNI and the name the certificate must carry; the endpoint address when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<VerificationMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VerificationMode {
    Secured,
    #[serde(rename = "SkipSAN")]
    SkipSan,
    #[serde(rename = "SkipCA")]
    SkipCa,
    SkipAll,
}

impl Spec for MeshExternalServiceSpec {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        if self.endpoints.is_empty() {
            errs.add(
                join(path, "endpoints"),
                "at least one endpoint required: where the service is (e.g. endpoints: [{address: api.example.com, port: 443}])",
            );
        }
        let mut seen = HashMap::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            if let Some(first) = seen.insert((&e.address, e.port), i) {
                errs.add(
                    index(path, "endpoints", i),
                    format!(
                        "duplicate endpoint {}:{} (endpoints[{first}] is the same)",
                        e.address.0, e.port.0
                    ),
                );
            }
        }
        if let Some(tls) = &self.tls {
            let p = join(path, "tls");
            if let Some(v) = &tls.verification {
                if !tls.enabled {
                    errs.add(join(&p, "verification"), "has no effect while tls.enabled is false (set enabled: true, or remove it)");
                }
                if let Some(name) = &v.server_name
                    && let Err(m) = check_hostname(name)
                {
                    errs.add(join(&p, "verification.serverName"), m);
                }
            }
        }
    }
}
