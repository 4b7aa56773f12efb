//! What the proxy runs on: the latest configuration the zone pushed, shared between the
//! session that writes it ([`State::apply`]) and the listeners that read it on every
//! connection or request ([`State::service`], [`State::view`]).
//!
//! This module is the contract between the session side (`client`, `admin`) and the traffic
//! side (`inbound`, `outbound`, `lb`, `tls`, `metrics`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_core::names::DnsName;
use weft_core::policy::ProxyView;
use weft_core::spec::fields::Protocol;
use weft_proto::dataplane::v1 as pb;

/// One configuration as applied: the resolved view and the endpoints of the wanted services.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub view: Arc<ProxyView>,
    pub services: BTreeMap<String, Arc<Service>>,
    /// The mesh's VIP table (only when the proxy asked for virtual outbounds), by DNS name.
    pub vips: Arc<BTreeMap<DnsName, Vip>>,
    /// 0 before the first update; bumped by every applied update.
    pub generation: u64,
    /// The nonce of the last applied update.
    pub nonce: u64,
}

/// A virtual IP of the mesh: what `name` resolves to, and the service behind it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Vip {
    pub name: DnsName,
    pub address: Ipv4Addr,
    pub service: String,
    /// Only this zone's endpoints (`<service>.<zone>.mesh`); `None`: every zone, ours first.
    pub zone: Option<String>,
    pub ports: Vec<u16>,
}

impl Vip {
    /// Check one wire VIP; errors name the field (`vips[i].address`).
    fn parse(i: usize, v: &pb::Vip) -> Result<Vip, String> {
        let name = match DnsName::parse(&v.name) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(format!("vips[{i}].name: {e}")),
            None => {
                return Err(format!(
                    "vips[{i}].name: {:?} is not under .mesh (expected <service>.mesh or <service>.<zone>.mesh)",
                    v.name
                ));
            }
        };
        let zone = (!v.zone.is_empty()).then(|| v.zone.clone());
        if name.service != v.service || name.zone != zone {
            return Err(format!(
                "vips[{i}].name: {:?} does not name service {:?}{}",
                v.name,
                v.service,
                zone.as_deref()
                    .map_or(String::new(), |z| format!(" in zone {z:?}"))
            ));
        }
        let address = v.address.parse::<Ipv4Addr>().map_err(|_| {
            format!(
                "vips[{i}].address: {:?} is not an IPv4 address (expected e.g. 240.0.0.1)",
                v.address
            )
        })?;
        if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
            return Err(format!(
                "vips[{i}].address: {address} cannot be a VIP (unspecified, broadcast or multicast)"
            ));
        }
        let ports = v
            .ports
            .iter()
            .enumerate()
            .map(|(j, p)| {
                u16::try_from(*p)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("vips[{i}].ports[{j}]: {p} is not a port"))
            })
            .collect::<Result<Vec<u16>, String>>()?;
        Ok(Vip {
            name,
            address,
            service: v.service.clone(),
            zone,
            ports,
        })
    }
}

/// A service the proxy may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// IP address or host name.
    pub address: String,
    pub port: u16,
    /// The Dataplane behind it.
    pub dataplane: String,
    pub zone: String,
    pub tags: Tags,
    pub weight: u32,
    /// The identity the server must present when it is not the service's own (the zone
    /// egress, for a MeshExternalService).
    pub server_identity: Option<weft_core::pki::SpiffeId>,
}

impl Endpoint {
    /// `address:port`, bracketed for IPv6.
    pub fn authority(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    /// The socket address when `address` is an IP.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.address.parse().ok()?, self.port))
    }
}

/// An endpoint's tags, sorted by key. Endpoints carry one or two tags; a `BTreeMap` would
/// cost a 500-byte node each, for every endpoint the proxy holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tags(Box<[(Box<str>, Box<str>)]>);

impl Tags {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Like a map's: a later value of the same key wins.
impl<K: Into<Box<str>>, V: Into<Box<str>>> FromIterator<(K, V)> for Tags {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Tags {
        let mut tags: Vec<(Box<str>, Box<str>)> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        // Stable: equal keys stay in order, and the last of them is kept.
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        tags.reverse();
        tags.dedup_by(|a, b| a.0 == b.0);
        tags.reverse();
        Tags(tags.into_boxed_slice())
    }
}

/// A JSON object, as the map was.
impl serde::Serialize for Tags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// Parse the wire name of a protocol (`tcp`, `http`, `http2`, `grpc`).
pub fn protocol(s: &str) -> Result<Protocol, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("unknown protocol {s:?} (expected tcp, http, http2 or grpc)"))
}

/// The shared, always-readable configuration. Cheap to clone.
#[derive(Clone, Debug)]
pub struct State {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    pub fn new() -> State {
        State {
            tx: Arc::new(watch::Sender::new(Arc::new(Snapshot::default()))),
        }
    }

    /// The configuration now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The endpoints of `service` now, if the zone sent any.
    pub fn service(&self, service: &str) -> Option<Arc<Service>> {
        self.tx.borrow().services.get(service).cloned()
    }

    /// The resolved policy view now.
    pub fn view(&self) -> Arc<ProxyView> {
        self.tx.borrow().view.clone()
    }

    /// The VIP of a mesh DNS name now.
    pub fn vip(&self, name: &DnsName) -> Option<Vip> {
        self.tx.borrow().vips.get(name).cloned()
    }

    /// Whether a first update has been applied.
    pub fn has_config(&self) -> bool {
        self.tx.borrow().generation > 0
    }

    /// Apply an update from the zone: all or nothing. An error is the NACK reason, and the
    /// configuration stays what it was.
    pub fn apply(&self, update: &pb::Update) -> Result<(), String> {
        let old = self.current();
        let view = match &update.view_json {
            Some(json) => Arc::new(
                serde_json::from_str::<ProxyView>(json).map_err(|e| format!("view_json: {e}"))?,
            ),
            None if update.full => {
                return Err("a full update without view_json".to_string());
            }
            None => old.view.clone(),
        };
        let mut services = if update.full {
            BTreeMap::new()
        } else {
            old.services.clone()
        };
        for s in &update.services {
            let protocol =
                protocol(&s.protocol).map_err(|e| format!("services[{}]: {e}", s.service))?;
            let mut endpoints = Vec::with_capacity(s.endpoints.len());
            for (i, e) in s.endpoints.iter().enumerate() {
                let port = u16::try_from(e.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        format!(
                            "services[{}].endpoints[{i}].port: {} is not a port",
                            s.service, e.port
                        )
                    })?;
                let server_identity = match e.server_identity.as_str() {
                    "" => None,
                    id => Some(weft_core::pki::SpiffeId::parse(id).map_err(|err| {
                        format!(
                            "services[{}].endpoints[{i}].server_identity: {err}",
                            s.service
                        )
                    })?),
                };
                endpoints.push(Endpoint {
                    address: e.address.clone(),
                    port,
                    dataplane: e.dataplane.clone(),
                    zone: e.zone.clone(),
                    tags: e
                        .tags
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                    weight: e.weight.max(1),
                    server_identity,
                });
            }
            services.insert(
                s.service.clone(),
                Arc::new(Service {
                    name: s.service.clone(),
                    protocol,
                    endpoints,
                }),
            );
        }
        for name in &update.removed_services {
            services.remove(name);
        }
        let vips = if update.vips_replace {
            let mut vips = BTreeMap::new();
            for (i, v) in update.vips.iter().enumerate() {
                let vip = Vip::parse(i, v)?;
                if vips.contains_key(&vip.name) {
                    return Err(format!("vips[{i}].name: {} is listed twice", vip.name));
                }
                vips.insert(vip.name.clone(), vip);
            }
            Arc::new(vips)
        } else {
            old.vips.clone()
        };
        self.tx.send_replace(Arc::new(Snapshot {
            view,
            services,
            vips,
            generation: old.generation + 1,
            nonce: update.nonce,
        }));
        Ok(())
    }
}

/// Who this proxy is, for logs and metric labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    pub mesh: String,
    pub zone: String,
    pub dataplane: String,
}

/// Everything a listener needs, shared by all of them. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    pub state: State,
    pub identity: Arc<crate::tls::Identity>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub labels: Arc<Labels>,
    /// Cancelled on SIGTERM: listeners stop accepting, open connections finish what they
    /// are doing (HTTP connections close after their in-flight requests).
    pub draining: CancellationToken,
    /// Every connection task is spawned on this tracker, so that `main` can wait for them to
    /// finish (with a deadline) after `draining` is cancelled.
    pub tasks: TaskTracker,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(full: bool, view: Option<&str>, services: Vec<pb::ServiceEndpoints>) -> pb::Update {
        pb::Update {
            nonce: 7,
            full,
            view_json: view.map(str::to_string),
            services,
            removed_services: vec![],
            vips_replace: false,
            vips: vec![],
        }
    }

    fn svc(name: &str, ports: &[u32]) -> pb::ServiceEndpoints {
        pb::ServiceEndpoints {
            service: name.into(),
            mesh: String::new(),
            protocol: "http".into(),
            endpoints: ports
                .iter()
                .map(|p| pb::Endpoint {
                    address: "127.0.0.1".into(),
                    port: *p,
                    dataplane: format!("dp-{p}"),
                    zone: "east".into(),
                    tags: Default::default(),
                    weight: 0,
                    server_identity: String::new(),
                })
                .collect(),
            external: None,
        }
    }

    const VIEW: &str = r#"{"mesh":"default","dataplane":"web","inbounds":[],"outbounds":{}}"#;

    #[test]
    fn full_then_delta_then_removal() {
        let state = State::new();
        assert!(!state.has_config());
        state
            .apply(&update(
                true,
                Some(VIEW),
                vec![svc("a", &[1, 2]), svc("b", &[3])],
            ))
            .unwrap();
        assert_eq!(state.service("a").unwrap().endpoints.len(), 2);
        assert_eq!(state.service("a").unwrap().endpoints[0].weight, 1);
        let b_before = state.service("b").unwrap();
        state
            .apply(&update(false, None, vec![svc("a", &[4])]))
            .unwrap();
        assert_eq!(state.service("a").unwrap().endpoints[0].port, 4);
        // Untouched services are the same allocation: a delta does not rebuild the rest.
        assert!(Arc::ptr_eq(&b_before, &state.service("b").unwrap()));
        let mut u = update(false, None, vec![]);
        u.removed_services = vec!["a".into()];
        state.apply(&u).unwrap();
        assert!(state.service("a").is_none());
        assert_eq!(state.current().generation, 3);
        assert_eq!(state.view().dataplane, "web");
    }

    #[test]
    fn a_bad_update_changes_nothing() {
        let state = State::new();
        state
            .apply(&update(true, Some(VIEW), vec![svc("a", &[1])]))
            .unwrap();
        let err = state
            .apply(&update(false, None, vec![svc("a", &[70000])]))
            .unwrap_err();
        assert!(err.contains("services[a].endpoints[0].port"), "{err}");
        let err = state.apply(&update(false, Some("{"), vec![])).unwrap_err();
        assert!(err.starts_with("view_json"), "{err}");
        let mut bad = svc("a", &[1]);
        bad.protocol = "udp".into();
        let err = state.apply(&update(false, None, vec![bad])).unwrap_err();
        assert!(err.contains("unknown protocol"), "{err}");
        assert_eq!(state.service("a").unwrap().endpoints[0].port, 1);
        assert_eq!(state.current().generation, 1);
    }

    #[test]
    fn tags_sorted_last_value_wins_json_object() {
        let tags: Tags = [("b", "1"), ("a", "2"), ("b", "3")].into_iter().collect();
        assert_eq!(tags.len(), 2);
        assert_eq!(tags.get("b"), Some("3"));
        assert_eq!(tags.get("a"), Some("2"));
        assert_eq!(tags.get("c"), None);
        assert_eq!(
            serde_json::to_string(&tags).unwrap(),
            r#"{"a":"2","b":"3"}"#
        );
        assert!(Tags::default().is_empty());
    }

    fn vip(name: &str, address: &str, zone: &str, ports: &[u32]) -> pb::Vip {
        pb::Vip {
            name: name.into(),
            address: address.into(),
            service: name.split('.').next().unwrap().into(),
            zone: zone.into(),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn vip_table_replaced_kept_and_validated() {
        let state = State::new();
        let mut u = update(true, Some(VIEW), vec![]);
        u.vips_replace = true;
        u.vips = vec![
            vip("backend.mesh", "240.0.0.1", "", &[80, 8080]),
            vip("backend.west.mesh", "240.0.0.2", "west", &[80]),
        ];
        state.apply(&u).unwrap();
        let west = state.vip(&DnsName::new("backend", Some("west"))).unwrap();
        assert_eq!(west.address, Ipv4Addr::new(240, 0, 0, 2));
        assert_eq!(west.zone.as_deref(), Some("west"));
        assert_eq!(
            state.vip(&DnsName::new("backend", None)).unwrap().ports,
            [80, 8080]
        );
        // Kept when not replaced, even by a full update.
        state
            .apply(&update(true, Some(VIEW), vec![svc("a", &[1])]))
            .unwrap();
        assert_eq!(state.current().vips.len(), 2);
        // All or nothing: one bad entry refuses the update and names it.
        for (bad, want) in [
            (vip("a.mesh", "240.0.0.300", "", &[80]), "vips[1].address"),
            (vip("a.mesh", "240.0.0.3", "", &[0]), "vips[1].ports[0]"),
            (vip("a.mesh", "240.0.0.3", "", &[65536]), "vips[1].ports[0]"),
            (vip("a.example.com", "240.0.0.3", "", &[80]), "vips[1].name"),
            (vip("a.west.mesh", "240.0.0.3", "", &[80]), "vips[1].name"),
            (vip("backend.mesh", "240.0.0.3", "", &[80]), "listed twice"),
        ] {
            let mut u = update(false, None, vec![]);
            u.vips_replace = true;
            u.vips = vec![vip("backend.mesh", "240.0.0.1", "", &[80]), bad];
            let err = state.apply(&u).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        assert_eq!(state.current().vips.len(), 2);
        // Replaced by an empty table.
        let mut u = update(false, None, vec![]);
        u.vips_replace = true;
        state.apply(&u).unwrap();
        assert!(state.current().vips.is_empty());
    }
}
