//! Specs of what runs in a zone and carries traffic: `Dataplane` (a sidecar and the service
//! instance next to it), `ZoneIngress` and `ZoneEgress`. Gateways are not modelled yet.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::Spec;
use super::fields::{Address, Protocol, check_service_tags, index};
use crate::validate::{Invalid, Name, Port, join};

/// Where an outbound listens when `address` is not given.
pub const DEFAULT_OUTBOUND_ADDRESS: &str = "127.0.0.1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataplaneSpec {
    pub networking: Networking,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Networking {
    /// The address other proxies reach this one on.
    pub address: Address,
    /// The address to publish when `address` is not reachable from other proxies (NAT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_address: Option<Address>,
    /// The ports the application serves, one per service it implements.
    #[serde(default)]
    pub inbound: Vec<Inbound>,
    /// Services the application calls through local listeners (without transparent proxying).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<Outbound>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inbound {
    /// The port the sidecar receives traffic on.
    pub port: Port,
    /// The port the application listens on; `port` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<Port>,
    /// `networking.address` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    /// Must contain `weft.io/service`.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Health {
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Outbound {
    pub port: Port,
    /// [`DEFAULT_OUTBOUND_ADDRESS`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    /// Must contain `weft.io/service`: the service called.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// The sidecar's admin listener (always on localhost).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Admin {
    pub port: Port,
}

impl Spec for DataplaneSpec {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        let n = &self.networking;
        let path = join(path, "networking");
        if n.inbound.is_empty() {
            errs.add(
                join(&path, "inbound"),
                "at least one inbound required: the port the application serves (e.g. inbound: [{port: 8080, tags: {weft.io/service: backend}}])",
            );
        }
        // (address, port) -> first index using it.
        let mut seen: HashMap<(&str, Port), usize> = HashMap::new();
        for (i, inbound) in n.inbound.iter().enumerate() {
            let p = index(&path, "inbound", i);
            check_service_tags(&join(&p, "tags"), &inbound.tags, errs);
            let address = inbound.address.as_ref().unwrap_or(&n.address).0.as_str();
            if let Some(first) = seen.insert((address, inbound.port), i) {
                errs.add(
                    join(&p, "port"),
                    format!("duplicate inbound port {} (inbound[{first}] uses it too; give each inbound its own port)", inbound.port.0),
                );
            }
        }
        if let Some(admin) = &n.admin
            && let Some(i) = n.inbound.iter().position(|ib| ib.port == admin.port)
        {
            errs.add(
                join(&path, "admin.port"),
                format!(
                    "port {} is already used by inbound[{i}] (pick another admin port)",
                    admin.port.0
                ),
            );
        }
        let mut seen: HashMap<(&str, Port), usize> = HashMap::new();
        for (i, outbound) in n.outbound.iter().enumerate() {
            let p = index(&path, "outbound", i);
            check_service_tags(&join(&p, "tags"), &outbound.tags, errs);
            let address = outbound
                .address
                .as_ref()
                .map_or(DEFAULT_OUTBOUND_ADDRESS, |a| a.0.as_str());
            if let Some(first) = seen.insert((address, outbound.port), i) {
                errs.add(
                    join(&p, "port"),
                    format!(
                        "duplicate outbound {address}:{} (outbound[{first}] listens there too; pick another port or address)",
                        outbound.port.0
                    ),
                );
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneIngressSpec {
    /// The zone it runs in; set by the zone control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<Name>,
    pub networking: IngressNetworking,
    /// What other zones can reach through this ingress; maintained by the zone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub available_services: Vec<AvailableService>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressNetworking {
    pub address: Address,
    /// The address other zones dial (e.g. a load balancer's), with `advertisedPort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_address: Option<Address>,
    pub port: Port,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_port: Option<Port>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AvailableService {
    pub mesh: Name,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub instances: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_service: Option<bool>,
}

impl Spec for ZoneIngressSpec {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        let n = &self.networking;
        let p = join(path, "networking");
        match (&n.advertised_address, &n.advertised_port) {
            (Some(_), None) => errs.add(
                join(&p, "advertisedPort"),
                "required with advertisedAddress (set both, or neither)",
            ),
            (None, Some(_)) => errs.add(
                join(&p, "advertisedAddress"),
                "required with advertisedPort (set both, or neither)",
            ),
            _ => {}
        }
        if let Some(admin) = &n.admin
            && admin.port == n.port
        {
            errs.add(
                join(&p, "admin.port"),
                format!(
                    "port {} is already the ingress port (pick another)",
                    n.port.0
                ),
            );
        }
        for (i, s) in self.available_services.iter().enumerate() {
            check_service_tags(
                &join(&index(path, "availableServices", i), "tags"),
                &s.tags,
                errs,
            );
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneEgressSpec {
    /// The zone it runs in; set by the zone control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<Name>,
    pub networking: EgressNetworking,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressNetworking {
    pub address: Address,
    pub port: Port,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
}

impl Spec for ZoneEgressSpec {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        let n = &self.networking;
        if let Some(admin) = &n.admin
            && admin.port == n.port
        {
            errs.add(
                join(path, "networking.admin.port"),
                format!(
                    "port {} is already the egress port (pick another)",
                    n.port.0
                ),
            );
        }
    }
}
