//! The routing table: `(mesh, service) -> local endpoints`, as the zone last sent it, plus
//! the zone's name (from `Registered`).
//!
//! This is the contract between the session (which writes it with [`Routes::apply`]) and the
//! data path (which reads it on every connection with [`Routes::current`]). Applying an
//! Update is pure ([`Table::apply`] returns a new table or the NACK reason), so it is tested
//! without tokio; [`Routes`] publishes the result through a `watch` of `Arc<Table>`, so an
//! update is atomic for readers: a connection sees the old table or the new one, never half.
//!
//! Removal semantics (the data-plane API names removed services without their mesh):
//! `removed_services` are applied FIRST and remove that service name from every mesh; then
//! the `services` of the same update are inserted. So a zone that removes `backend` from mesh
//! `a` while `backend` still exists in mesh `b` re-sends mesh `b`'s set in the same update.
//! A service with an empty endpoint list stays in the table: it is known, with no endpoints.
//!
//! A zone egress's table also holds, for the meshes that require the egress
//! (`routing.zoneEgress`), the routes to other zones' services: a set without `external`
//! whose endpoints are other zones' ingresses, each with its `zone`
//! ([`Service::pick_in_zone`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use tokio::sync::watch;
use weft_proto::dataplane::v1 as pb;

/// A table key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Key {
    pub mesh: String,
    pub service: String,
}

impl Key {
    pub fn new(mesh: &str, service: &str) -> Key {
        Key {
            mesh: mesh.to_string(),
            service: service.to_string(),
        }
    }
}

/// One local service of one mesh.
#[derive(Debug, Serialize)]
pub struct Service {
    pub mesh: String,
    pub service: String,
    /// What the zone says the service speaks (informational: the ingress passes bytes).
    pub protocol: String,
    pub endpoints: Vec<Endpoint>,
    /// A zone egress's MeshExternalService: how to reach the endpoints and who may.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<External>,
    /// Round-robin position (shared by every zone's subset); a new set (after an update)
    /// starts again at 0.
    #[serde(skip)]
    next: AtomicUsize,
}

/// What the zone says about a MeshExternalService (egress mode).
#[derive(Debug, Serialize)]
pub struct External {
    /// Originate TLS to the endpoints.
    pub tls: bool,
    /// SNI and the name to verify; the endpoint's address when empty.
    pub server_name: String,
    pub verification: Verification,
    /// The MeshTrafficPermission rules that apply (`allows` decides per caller).
    pub permissions: weft_core::policy::InboundView,
    /// Deny callers no rule allows.
    pub default_deny: bool,
}

/// How the external server's certificate is checked (MeshExternalService
/// `tls.verification.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verification {
    /// Chain to a trusted root and the name.
    Secured,
    /// Chain only.
    SkipSan,
    /// Nothing (SkipCA is treated as this: see docs/cross-zone.md).
    SkipAll,
}

impl Service {
    pub fn new(mesh: &str, service: &str, protocol: &str, endpoints: Vec<Endpoint>) -> Service {
        Service {
            mesh: mesh.to_string(),
            service: service.to_string(),
            protocol: protocol.to_string(),
            endpoints,
            external: None,
            next: AtomicUsize::new(0),
        }
    }

    /// The endpoints in the order to try them for one connection: round robin over
    /// connections (each call starts one further), then the others in turn as fallbacks.
    pub fn pick(&self) -> impl Iterator<Item = &Endpoint> {
        let n = self.endpoints.len();
        let start = if n == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        };
        (0..n).map(move |i| &self.endpoints[(start + i) % n])
    }

    /// Like [`Service::pick`], over the endpoints in `zone` only (an egress's route to that
    /// zone's ingresses).
    pub fn pick_in_zone<'a>(&'a self, zone: &'a str) -> impl Iterator<Item = &'a Endpoint> {
        let in_zone: Vec<&Endpoint> = self.endpoints.iter().filter(|e| e.zone == zone).collect();
        let n = in_zone.len();
        let start = if n == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        };
        (0..n).map(move |i| in_zone[(start + i) % n])
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// IP address or host name.
    pub address: String,
    pub port: u16,
    /// The Dataplane behind it (or the ingress, for an egress's route to another zone).
    pub dataplane: String,
    /// The zone the endpoint is in (another zone, for an egress's routes).
    pub zone: String,
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
}

/// One routing table as applied.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// The zone this ingress serves (from `Registered`); empty before the first one.
    pub zone: String,
    pub services: BTreeMap<Key, Arc<Service>>,
    /// 0 before the first update; bumped by every applied update.
    pub generation: u64,
    /// The nonce of the last applied update.
    pub nonce: u64,
}

impl Table {
    /// The service `(mesh, service)`, if the zone sent it.
    pub fn get(&self, mesh: &str, service: &str) -> Option<&Arc<Service>> {
        // BTreeMap lookups need an owned key; services are few per connection, so this
        // allocation is fine next to a TCP connect.
        self.services.get(&Key::new(mesh, service))
    }

    /// The table after `update`, or the NACK reason (this table is unchanged either way).
    /// Untouched services keep their allocation (and round-robin position).
    pub fn apply(&self, update: &pb::Update) -> Result<Table, String> {
        let mut services = if update.full {
            BTreeMap::new()
        } else {
            self.services.clone()
        };
        for name in &update.removed_services {
            if name.is_empty() {
                return Err("removed_services: an empty service name".to_string());
            }
            services.retain(|k, _| k.service != *name);
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in update.services.iter().enumerate() {
            let at = format!("services[{i}]");
            if s.mesh.is_empty() {
                return Err(format!(
                    "{at}.mesh: empty (a zone ingress needs the mesh of every service)"
                ));
            }
            if s.service.is_empty() {
                return Err(format!("{at}.service: empty"));
            }
            let key = Key::new(&s.mesh, &s.service);
            if !seen.insert(key.clone()) {
                return Err(format!(
                    "{at}: service {:?} of mesh {:?} appears twice in one update",
                    s.service, s.mesh
                ));
            }
            let mut endpoints = Vec::with_capacity(s.endpoints.len());
            for (j, e) in s.endpoints.iter().enumerate() {
                if e.address.is_empty() {
                    return Err(format!("{at}.endpoints[{j}].address: empty"));
                }
                let port = u16::try_from(e.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{at}.endpoints[{j}].port: {} is not a port", e.port))?;
                endpoints.push(Endpoint {
                    address: e.address.clone(),
                    port,
                    dataplane: e.dataplane.clone(),
                    zone: e.zone.clone(),
                });
            }
            let mut service = Service::new(&s.mesh, &s.service, &s.protocol, endpoints);
            if let Some(x) = &s.external {
                let permissions = if x.permissions_json.is_empty() {
                    weft_core::policy::InboundView::default()
                } else {
                    serde_json::from_str(&x.permissions_json)
                        .map_err(|e| format!("{at}.external.permissions_json: {e}"))?
                };
                let verification = match x.verification_mode.as_str() {
                    "" | "Secured" => Verification::Secured,
                    "SkipSAN" => Verification::SkipSan,
                    "SkipCA" | "SkipAll" => Verification::SkipAll,
                    other => {
                        return Err(format!(
                            "{at}.external.verification_mode: {other:?} (expected Secured, SkipSAN, SkipCA or SkipAll)"
                        ));
                    }
                };
                if !x.server_name.is_empty() {
                    rustls_pki_types::ServerName::try_from(x.server_name.as_str()).map_err(
                        |e| format!("{at}.external.server_name: {:?}: {e}", x.server_name),
                    )?;
                }
                service.external = Some(External {
                    tls: x.tls,
                    server_name: x.server_name.clone(),
                    verification,
                    permissions,
                    default_deny: x.default_deny,
                });
            }
            services.insert(key, Arc::new(service));
        }
        Ok(Table {
            zone: self.zone.clone(),
            services,
            generation: self.generation + 1,
            nonce: update.nonce,
        })
    }
}

/// The shared, always-readable routing table. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Routes {
    tx: Arc<watch::Sender<Arc<Table>>>,
}

impl Default for Routes {
    fn default() -> Self {
        Self::new()
    }
}

impl Routes {
    pub fn new() -> Routes {
        Routes {
            tx: Arc::new(watch::Sender::new(Arc::new(Table::default()))),
        }
    }

    /// The table now.
    pub fn current(&self) -> Arc<Table> {
        self.tx.borrow().clone()
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Table>> {
        self.tx.subscribe()
    }

    /// Whether a first update has been applied.
    pub fn has_table(&self) -> bool {
        self.tx.borrow().generation > 0
    }

    /// Set the zone's name (from `Registered`).
    pub fn set_zone(&self, zone: &str) {
        self.tx.send_if_modified(|t| {
            if t.zone == zone {
                return false;
            }
            let mut new = Table::clone(t);
            new.zone = zone.to_string();
            *t = Arc::new(new);
            true
        });
    }

    /// Apply an update from the zone: all or nothing. An error is the NACK reason, and the
    /// table stays what it was.
    pub fn apply(&self, update: &pb::Update) -> Result<(), String> {
        let mut result = Ok(());
        self.tx.send_if_modified(|t| match t.apply(update) {
            Ok(new) => {
                *t = Arc::new(new);
                true
            }
            Err(e) => {
                result = Err(e);
                false
            }
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(full: bool, services: Vec<pb::ServiceEndpoints>, removed: &[&str]) -> pb::Update {
        pb::Update {
            nonce: 7,
            full,
            services,
            removed_services: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn svc(mesh: &str, name: &str, ports: &[u32]) -> pb::ServiceEndpoints {
        pb::ServiceEndpoints {
            service: name.into(),
            mesh: mesh.into(),
            protocol: "tcp".into(),
            endpoints: ports
                .iter()
                .map(|p| pb::Endpoint {
                    address: "127.0.0.1".into(),
                    port: *p,
                    dataplane: format!("dp-{p}"),
                    zone: "east".into(),
                    ..Default::default()
                })
                .collect(),
            external: None,
        }
    }

    fn ports(t: &Table, mesh: &str, service: &str) -> Option<Vec<u16>> {
        t.get(mesh, service)
            .map(|s| s.endpoints.iter().map(|e| e.port).collect())
    }

    #[test]
    fn full_then_delta_then_removal() {
        let routes = Routes::new();
        assert!(!routes.has_table());
        routes.set_zone("east");
        routes
            .apply(&update(
                true,
                vec![
                    svc("payments", "backend", &[1, 2]),
                    svc("shop", "backend", &[3]),
                    svc("payments", "db", &[4]),
                ],
                &[],
            ))
            .unwrap();
        let t = routes.current();
        assert!(routes.has_table());
        assert_eq!(t.zone, "east");
        assert_eq!(ports(&t, "payments", "backend"), Some(vec![1, 2]));
        assert_eq!(ports(&t, "shop", "backend"), Some(vec![3]));
        let db_before = t.get("payments", "db").unwrap().clone();

        // A delta replaces only what it names.
        routes
            .apply(&update(false, vec![svc("payments", "backend", &[5])], &[]))
            .unwrap();
        let t = routes.current();
        assert_eq!(ports(&t, "payments", "backend"), Some(vec![5]));
        assert_eq!(ports(&t, "shop", "backend"), Some(vec![3]));
        assert!(Arc::ptr_eq(&db_before, t.get("payments", "db").unwrap()));

        // An empty set: known, no endpoints.
        routes
            .apply(&update(false, vec![svc("payments", "db", &[])], &[]))
            .unwrap();
        assert_eq!(ports(&routes.current(), "payments", "db"), Some(vec![]));

        // Removal by name takes the service out of every mesh; a set in the same update is
        // applied after the removal.
        routes
            .apply(&update(
                false,
                vec![svc("shop", "backend", &[6])],
                &["backend"],
            ))
            .unwrap();
        let t = routes.current();
        assert_eq!(ports(&t, "payments", "backend"), None);
        assert_eq!(ports(&t, "shop", "backend"), Some(vec![6]));
        assert_eq!(t.generation, 4);
        assert_eq!(t.nonce, 7);

        // A full update replaces everything.
        routes
            .apply(&update(true, vec![svc("shop", "web", &[7])], &[]))
            .unwrap();
        let t = routes.current();
        assert_eq!(t.services.len(), 1);
        assert_eq!(ports(&t, "shop", "web"), Some(vec![7]));
        assert_eq!(t.zone, "east", "the zone survives updates");
    }

    #[test]
    fn a_bad_update_changes_nothing() {
        let routes = Routes::new();
        routes
            .apply(&update(true, vec![svc("payments", "backend", &[1])], &[]))
            .unwrap();
        let before = routes.current();
        let cases = [
            (
                update(false, vec![svc("payments", "backend", &[70000])], &[]),
                "services[0].endpoints[0].port: 70000 is not a port",
            ),
            (
                update(false, vec![svc("payments", "backend", &[0])], &[]),
                "is not a port",
            ),
            (
                update(false, vec![svc("", "backend", &[2])], &[]),
                "services[0].mesh: empty",
            ),
            (
                update(false, vec![svc("payments", "", &[2])], &[]),
                "services[0].service: empty",
            ),
            (
                update(
                    false,
                    vec![svc("payments", "db", &[2]), svc("payments", "db", &[3])],
                    &[],
                ),
                "appears twice",
            ),
            (
                // The good first half must not be applied either.
                update(
                    true,
                    vec![svc("payments", "web", &[2]), svc("payments", "x", &[0])],
                    &[],
                ),
                "services[1].endpoints[0].port",
            ),
            (update(false, vec![], &[""]), "removed_services"),
        ];
        for (u, want) in cases {
            let err = routes.apply(&u).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
            assert!(
                Arc::ptr_eq(&before, &routes.current()),
                "{want}: the table changed"
            );
        }
        let mut u = update(false, vec![svc("payments", "x", &[1])], &[]);
        u.services[0].endpoints[0].address.clear();
        assert!(routes.apply(&u).unwrap_err().contains("address: empty"));
        assert_eq!(routes.current().generation, 1);
        assert_eq!(
            ports(&routes.current(), "payments", "backend"),
            Some(vec![1])
        );
    }

    #[test]
    fn round_robin_then_fallbacks() {
        let eps = (1..=3)
            .map(|p| Endpoint {
                address: "127.0.0.1".into(),
                port: p,
                dataplane: String::new(),
                zone: if p == 2 { "west".into() } else { String::new() },
            })
            .collect();
        let s = Service::new("m", "s", "tcp", eps);
        let order = |s: &Service| s.pick().map(|e| e.port).collect::<Vec<_>>();
        assert_eq!(order(&s), vec![1, 2, 3]);
        assert_eq!(order(&s), vec![2, 3, 1]);
        assert_eq!(order(&s), vec![3, 1, 2]);
        assert_eq!(order(&s), vec![1, 2, 3]);
        let empty = Service::new("m", "s", "tcp", vec![]);
        assert_eq!(empty.pick().count(), 0);
        let west = |s: &Service| s.pick_in_zone("west").map(|e| e.port).collect::<Vec<_>>();
        assert_eq!(west(&s), vec![2]);
        assert_eq!(s.pick_in_zone("north").count(), 0);
    }
}
