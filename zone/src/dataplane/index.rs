//! The zone's view of its proxies and services, in plain synchronous code behind one lock (no
//! I/O, no `.await`): which dataplanes and zone ingresses are online, the endpoints each
//! dataplane contributes per service, which sessions want which services, the policy
//! resources per mesh, what other zones offer (their MeshServices and ZoneIngresses, received
//! over KDS), the VIP table per mesh, and what each session still has to be sent
//! (`Pending`). Events come in (a session registers or ends, a resource changes); sessions
//! are woken through their `Notify` and take a [`Plan`]; the writer task is woken through
//! [`Index::writer`] and takes [`Writes`] (the managed MeshServices and `vips.json` to write).
//!
//! Cost: a change of one dataplane touches the services it serves and wakes only their
//! subscribers (plus the mesh's virtual-outbound sessions and the zone ingresses); a change
//! of another zone's MeshService or ZoneIngress wakes the subscribers of the services
//! concerned; a policy change wakes the sessions of its mesh (each re-resolves its view).
//!
//! Endpoint set of service S of mesh M for a proxy: the local instances, plus, for every
//! other zone Z whose MeshService for S reports `status.instances > 0`, one endpoint per
//! ZoneIngress of Z (weight = instances). Zone ingresses get only the local instances.
//! When M's `routing.zoneEgress` is true, Z's endpoints are this zone's egresses instead
//! (still `zone` = Z, weight = instances, no `server_identity`: the egress passes the TLS
//! through), none without an egress; the egresses get, per such S, Z's ingresses (the
//! "routes": a set without `external`, each endpoint's `zone` = Z).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use weft_core::names::DnsName;
use weft_core::spec::dataplane::Networking;
use weft_core::spec::dataplane::ZoneEgressSpec;
use weft_core::spec::service::{MeshExternalServiceSpec, MeshServiceSpec};
use weft_core::spec::{DataplaneSpec, MeshSpec, SERVICE_TAG, ZoneIngressSpec};
use weft_core::{Key, Kind, Resource, ZONE_LABEL};
use weft_proto::dataplane::v1 as pb;

use crate::vip;

/// A dataplane: (mesh, name). A zone ingress's session is (`""`, name).
pub type DpKey = (String, String);
/// A service of a mesh: (mesh, service).
pub type SvcKey = (String, String);

/// The `weft.io/managed-by` value of the MeshServices the zone generates.
pub const MANAGED_BY: &str = "weft-zone";

/// What one online dataplane contributes to one service: its protocols and endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution {
    pub protocols: BTreeSet<String>,
    pub endpoints: Vec<pb::Endpoint>,
}

/// Ends a session from outside (a newer session, the dataplane deleted).
#[derive(Default)]
pub struct Close {
    pub token: CancellationToken,
    reason: Mutex<String>,
}

impl Close {
    pub fn close(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.token.cancel();
    }

    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What kind of client a session serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A sidecar; with `virtual_outbounds` it wants every service of its mesh and the VIPs.
    Proxy { virtual_outbounds: bool },
    /// A zone ingress: the local endpoints of every service of every mesh.
    Ingress,
    /// A zone egress: every MeshExternalService of every mesh, with its permissions.
    Egress,
}

/// The session key of zone egress `name`: `*` is no mesh name, so it cannot collide with a
/// dataplane's or an ingress's.
pub fn egress_key(name: &str) -> DpKey {
    ("*".to_string(), name.to_string())
}

impl Role {
    fn is_virtual(self) -> bool {
        self == Role::Proxy {
            virtual_outbounds: true,
        }
    }
}

/// What a session still has to send.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pending {
    pub full: bool,
    pub view: bool,
    /// The mesh's VIP table (virtual-outbound sessions).
    pub vips: bool,
    pub services: BTreeSet<SvcKey>,
    pub removed: BTreeSet<String>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        !self.full
            && !self.view
            && !self.vips
            && self.services.is_empty()
            && self.removed.is_empty()
    }
}

/// What the zone last sent a proxy, for `/_inspect/dataplanes/{mesh}/{name}/config` and to
/// send only what changed.
#[derive(Clone, Debug, Default)]
pub struct Sent {
    pub view_json: Option<String>,
    pub services: BTreeMap<SvcKey, pb::ServiceEndpoints>,
    /// (not after, SPIFFE ID) of the last certificate issued.
    pub certificate: Option<(SystemTime, String)>,
}

/// The key a sent endpoint set is recorded under: its mesh (the session's for proxies).
pub fn sent_key(session_mesh: &str, s: &pb::ServiceEndpoints) -> SvcKey {
    let mesh = if s.mesh.is_empty() {
        session_mesh
    } else {
        &s.mesh
    };
    (mesh.to_string(), s.service.clone())
}

/// The session's status, for `/_inspect/dataplanes`.
#[derive(Clone, Debug, Default)]
pub struct Insight {
    pub service: String,
    pub version: String,
    pub connected_since: Option<SystemTime>,
    pub last_seen: Option<SystemTime>,
    pub last_sent_nonce: u64,
    pub last_acked_nonce: u64,
    /// (nonce, reason).
    pub last_nack: Option<(u64, String)>,
}

struct Session {
    id: u64,
    resource: Resource,
    role: Role,
    contributes: BTreeMap<String, Contribution>,
    wanted: BTreeSet<String>,
    pending: Pending,
    notify: Arc<Notify>,
    close: Arc<Close>,
    insight: Insight,
    sent: Sent,
}

impl Session {
    fn wake(&self) {
        if !self.pending.is_empty() {
            self.notify.notify_one();
        }
    }
}

#[derive(Default)]
struct ServiceEntry {
    by_dp: BTreeMap<String, Contribution>,
    subscribers: BTreeSet<String>,
}

#[derive(Default)]
struct MeshState {
    /// The Mesh itself, its policies, MeshServices and MeshExternalServices.
    resources: BTreeMap<Key, Resource>,
    snapshot: Option<Arc<Vec<Resource>>>,
    spec: Option<MeshSpec>,
    /// Sessions of this mesh with virtual outbounds.
    virtual_sessions: BTreeSet<String>,
    /// The VIP table, per service.
    vips: BTreeMap<String, Vec<pb::Vip>>,
}

/// Another zone's MeshService as received over KDS.
#[derive(Clone, Debug, PartialEq)]
struct Remote {
    instances: u32,
    /// port -> appProtocol.
    ports: BTreeMap<u32, Option<String>>,
}

/// What a service looks like in one zone.
#[derive(Clone, Debug, Default, PartialEq)]
struct ZoneInfo {
    instances: u32,
    /// port -> protocol.
    ports: BTreeMap<u32, String>,
}

/// What a session sends next: taken from the index, computed outside the lock.
#[derive(Debug)]
pub struct Plan {
    pub pending: Pending,
    pub resource: Resource,
    pub role: Role,
    /// The resources `policy::resolve` needs, when the view is to be (re)computed.
    pub mesh_resources: Option<Arc<Vec<Resource>>>,
    /// The endpoint sets of `pending.services` (all wanted when full) now.
    pub services: Vec<pb::ServiceEndpoints>,
    /// What was last sent.
    pub sent_view: Option<String>,
    pub sent_services: BTreeMap<SvcKey, pb::ServiceEndpoints>,
    /// The mesh's whole VIP table, when it is to be (re)sent.
    pub vips: Option<Vec<pb::Vip>>,
}

/// What the writer task writes next (outside the lock).
#[derive(Debug, Default)]
pub struct Writes {
    /// The managed MeshService each service should have now (its spec), `None`: none.
    pub services: Vec<(SvcKey, Option<Value>)>,
    /// The new content of `vips.json`, when the table changed.
    pub vips_json: Option<String>,
}

/// A registered session's handles.
pub struct Registration {
    pub id: u64,
    pub notify: Arc<Notify>,
    pub close: Arc<Close>,
}

pub struct Index {
    zone: String,
    next_id: u64,
    sessions: HashMap<DpKey, Session>,
    services: HashMap<SvcKey, ServiceEntry>,
    meshes: HashMap<String, MeshState>,
    /// The last insight and config of dataplanes whose session ended.
    past: HashMap<DpKey, (Insight, Sent)>,
    /// Sessions of zone ingresses.
    ingresses: BTreeSet<DpKey>,
    /// Sessions of this zone's egresses, with the address and port proxies dial.
    egresses: BTreeMap<DpKey, (String, u32)>,
    /// Every local Dataplane in the store (online or not): per service, per dataplane, the
    /// ports it declares (port -> protocol).
    declared: HashMap<SvcKey, BTreeMap<String, BTreeMap<u32, String>>>,
    dp_declares: HashMap<DpKey, BTreeSet<String>>,
    /// Other zones' MeshServices: per service, per zone.
    remote: HashMap<SvcKey, BTreeMap<String, Remote>>,
    remote_keys: HashMap<Key, (SvcKey, String)>,
    /// Other zones' ZoneIngresses: per zone, per name, the address other zones dial.
    remote_ingresses: BTreeMap<String, BTreeMap<String, (String, u32)>>,
    remote_ingress_zone: HashMap<String, String>,
    /// Meshes whose proxies got no cross-zone endpoints because the mesh requires the egress
    /// and none is connected: logged once per mesh until an egress connects.
    no_egress_logged: Mutex<BTreeSet<String>>,
    vips: vip::Allocator,
    /// Services whose managed MeshService may have to change.
    dirty_services: BTreeSet<SvcKey>,
    writer: Arc<Notify>,
}

/// Whether a Mesh's spec requires cross-zone traffic to go through the zone egress.
fn zone_egress_routing(spec: &MeshSpec) -> bool {
    spec.routing.as_ref().and_then(|r| r.zone_egress) == Some(true)
}

/// Whether resources of `kind` go into a mesh's policy context.
pub fn in_mesh_context(kind: Kind) -> bool {
    kind == Kind::Mesh
        || kind.is_policy()
        || matches!(kind, Kind::MeshService | Kind::MeshExternalService)
}

/// The kinds the index follows in the store.
pub fn followed(kind: Kind) -> bool {
    in_mesh_context(kind) || matches!(kind, Kind::Dataplane | Kind::ZoneIngress)
}

/// The services a Dataplane's outbounds name.
pub fn wanted(spec: &DataplaneSpec) -> BTreeSet<String> {
    spec.networking
        .outbound
        .iter()
        .filter_map(|o| o.tags.get(SERVICE_TAG).cloned())
        .collect()
}

fn protocol_name(p: Option<&weft_core::spec::fields::Protocol>) -> String {
    match p {
        None => "tcp".to_string(),
        Some(p) => serde_json::to_value(p)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "tcp".to_string()),
    }
}

/// Where other proxies reach an inbound: its own address, else the advertised address, else
/// the dataplane's address.
fn endpoint_address(n: &Networking, inbound: &weft_core::spec::dataplane::Inbound) -> String {
    inbound
        .address
        .as_ref()
        .or(n.advertised_address.as_ref())
        .unwrap_or(&n.address)
        .0
        .clone()
}

/// What dataplane `name` of `zone` contributes, per service it serves: its ready inbounds.
pub fn contributions(
    zone: &str,
    name: &str,
    spec: &DataplaneSpec,
) -> BTreeMap<String, Contribution> {
    let n = &spec.networking;
    let mut out: BTreeMap<String, Contribution> = BTreeMap::new();
    for ib in &n.inbound {
        let Some(service) = ib.tags.get(SERVICE_TAG) else {
            continue;
        };
        if ib.health.as_ref().is_some_and(|h| !h.ready) {
            continue;
        }
        let c = out.entry(service.clone()).or_insert_with(|| Contribution {
            protocols: BTreeSet::new(),
            endpoints: Vec::new(),
        });
        c.protocols.insert(protocol_name(ib.protocol.as_ref()));
        c.endpoints.push(pb::Endpoint {
            address: endpoint_address(n, ib),
            port: u32::from(ib.port.0),
            dataplane: name.to_string(),
            zone: zone.to_string(),
            tags: ib
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            weight: 1,
            server_identity: String::new(),
        });
    }
    out
}

/// The services a Dataplane declares (ready or not), with their ports and protocols.
fn declarations(spec: &DataplaneSpec) -> BTreeMap<String, BTreeMap<u32, String>> {
    let mut out: BTreeMap<String, BTreeMap<u32, String>> = BTreeMap::new();
    for ib in &spec.networking.inbound {
        if let Some(service) = ib.tags.get(SERVICE_TAG) {
            out.entry(service.clone())
                .or_default()
                .insert(u32::from(ib.port.0), protocol_name(ib.protocol.as_ref()));
        }
    }
    out
}

fn spec_of(r: &Resource) -> Option<DataplaneSpec> {
    serde_json::from_value(r.spec.clone()).ok()
}

/// The one protocol of a set, tcp when they disagree; `None` for an empty set.
fn agreed<'a>(protocols: impl IntoIterator<Item = &'a String>) -> Option<String> {
    let set: BTreeSet<&String> = protocols.into_iter().collect();
    match set.len() {
        0 => None,
        1 => set.into_iter().next().cloned(),
        _ => Some("tcp".to_string()),
    }
}

impl ServiceEntry {
    /// The local endpoints, dataplanes in name order, and the protocols they declare.
    fn local(&self) -> (BTreeSet<String>, Vec<pb::Endpoint>) {
        let mut protocols = BTreeSet::new();
        let mut endpoints = Vec::new();
        for c in self.by_dp.values() {
            protocols.extend(c.protocols.iter().cloned());
            endpoints.extend(c.endpoints.iter().cloned());
        }
        (protocols, endpoints)
    }
}

/// A MeshService without its status: what the policy context depends on.
fn without_status(r: &Resource) -> (BTreeMap<String, String>, Value) {
    let mut spec = r.spec.clone();
    if let Some(o) = spec.as_object_mut() {
        o.remove("status");
    }
    (r.labels.clone(), spec)
}

impl Index {
    /// An index for `zone` with a fresh VIP table over the default range.
    pub fn new(zone: &str) -> Index {
        let cidr = vip::DEFAULT_CIDR.parse().expect("valid default");
        Index::with_vips(zone, vip::Allocator::new(cidr, vip::DEFAULT_RETENTION))
    }

    /// An index for `zone` that allocates VIPs from `vips` (loaded from the data dir).
    pub fn with_vips(zone: &str, vips: vip::Allocator) -> Index {
        Index {
            zone: zone.to_string(),
            next_id: 0,
            sessions: HashMap::new(),
            services: HashMap::new(),
            meshes: HashMap::new(),
            past: HashMap::new(),
            ingresses: BTreeSet::new(),
            egresses: BTreeMap::new(),
            declared: HashMap::new(),
            dp_declares: HashMap::new(),
            remote: HashMap::new(),
            remote_keys: HashMap::new(),
            remote_ingresses: BTreeMap::new(),
            remote_ingress_zone: HashMap::new(),
            no_egress_logged: Mutex::new(BTreeSet::new()),
            vips,
            dirty_services: BTreeSet::new(),
            writer: Arc::new(Notify::new()),
        }
    }

    /// Notified when there is something for the writer task ([`Index::take_writes`]).
    pub fn writer(&self) -> Arc<Notify> {
        self.writer.clone()
    }

    /// Online sessions.
    pub fn online(&self) -> usize {
        self.sessions.len()
    }

    /// The Mesh's spec, when the zone has the Mesh.
    pub fn mesh_spec(&self, mesh: &str) -> Option<MeshSpec> {
        self.meshes.get(mesh).and_then(|m| m.spec.clone())
    }

    /// The stored resource of the session of `key`, if one is online.
    pub fn resource_of(&self, key: &DpKey) -> Option<Resource> {
        self.sessions.get(key).map(|s| s.resource.clone())
    }

    /// Whether session `key` is online (any id).
    pub fn is_online(&self, key: &DpKey) -> bool {
        self.sessions.contains_key(key)
    }

    /// Register a session for the stored (stamped) Dataplane or ZoneIngress `resource`. A
    /// session already there for the same dataplane (ingress) is closed and replaced.
    pub fn register(
        &mut self,
        resource: Resource,
        role: Role,
        service: &str,
        version: &str,
    ) -> Registration {
        let key: DpKey = match role {
            Role::Ingress => (String::new(), resource.name.clone()),
            Role::Egress => egress_key(&resource.name),
            Role::Proxy { .. } => (
                resource.mesh.clone().unwrap_or_default(),
                resource.name.clone(),
            ),
        };
        if let Some(old) = self.remove_session(&key) {
            let what = match role {
                Role::Ingress => format!("zone ingress {:?}", key.1),
                Role::Egress => format!("zone egress {:?}", key.1),
                Role::Proxy { .. } => format!("dataplane {:?} in mesh {:?}", key.1, key.0),
            };
            old.close(format!("replaced by a newer session of {what}"));
        }
        self.next_id += 1;
        let id = self.next_id;
        let notify = Arc::new(Notify::new());
        let close = Arc::new(Close::default());
        let now = SystemTime::now();
        let (wanted, contributes) = match role {
            Role::Ingress | Role::Egress => (BTreeSet::new(), BTreeMap::new()),
            Role::Proxy { .. } => {
                let spec = spec_of(&resource);
                (
                    spec.as_ref().map(wanted).unwrap_or_default(),
                    spec.as_ref()
                        .map(|s| contributions(&self.zone, &key.1, s))
                        .unwrap_or_default(),
                )
            }
        };
        for s in &wanted {
            self.services
                .entry((key.0.clone(), s.clone()))
                .or_default()
                .subscribers
                .insert(key.1.clone());
        }
        match role {
            Role::Ingress => {
                self.ingresses.insert(key.clone());
            }
            Role::Egress => match serde_json::from_value::<ZoneEgressSpec>(resource.spec.clone()) {
                Ok(spec) => {
                    let n = &spec.networking;
                    self.egresses
                        .insert(key.clone(), (n.address.0.clone(), u32::from(n.port.0)));
                }
                Err(e) => {
                    tracing::error!(egress = %key.1, error = %e, "the ZoneEgress does not parse: proxies will not be sent its address")
                }
            },
            Role::Proxy {
                virtual_outbounds: true,
            } => {
                self.meshes
                    .entry(key.0.clone())
                    .or_default()
                    .virtual_sessions
                    .insert(key.1.clone());
            }
            Role::Proxy { .. } => {}
        }
        let sent = self.past.remove(&key).map(|(_, s)| s).unwrap_or_default();
        self.sessions.insert(
            key.clone(),
            Session {
                id,
                resource,
                role,
                contributes: BTreeMap::new(),
                wanted,
                pending: Pending {
                    full: true,
                    view: matches!(role, Role::Proxy { .. }),
                    vips: role.is_virtual(),
                    ..Pending::default()
                },
                notify: notify.clone(),
                close: close.clone(),
                insight: Insight {
                    service: service.to_string(),
                    version: version.to_string(),
                    connected_since: Some(now),
                    last_seen: Some(now),
                    ..Insight::default()
                },
                sent: Sent {
                    certificate: sent.certificate,
                    ..Sent::default()
                },
            },
        );
        self.set_contributions(&key, contributes);
        self.sessions[&key].wake();
        if role == Role::Egress {
            self.egresses_changed();
        }
        Registration { id, notify, close }
    }

    /// The session `id` of `key` ended: withdraw its endpoints from everyone.
    pub fn unregister(&mut self, key: &DpKey, id: u64) -> bool {
        if self.sessions.get(key).is_none_or(|s| s.id != id) {
            return false;
        }
        self.remove_session(key);
        true
    }

    fn remove_session(&mut self, key: &DpKey) -> Option<Arc<Close>> {
        self.set_contributions(key, BTreeMap::new());
        let s = self.sessions.remove(key)?;
        for svc in &s.wanted {
            let k = (key.0.clone(), svc.clone());
            if let Some(e) = self.services.get_mut(&k) {
                e.subscribers.remove(&key.1);
                if e.subscribers.is_empty() && e.by_dp.is_empty() {
                    self.services.remove(&k);
                }
            }
        }
        self.ingresses.remove(key);
        if self.egresses.remove(key).is_some() {
            self.egresses_changed();
        }
        if let Some(m) = self.meshes.get_mut(&key.0) {
            m.virtual_sessions.remove(&key.1);
        }
        let mut insight = s.insight;
        insight.last_seen = Some(SystemTime::now());
        self.past.insert(key.clone(), (insight, s.sent));
        Some(s.close)
    }

    /// Replace what `key` contributes, waking the sessions of every service that changed.
    fn set_contributions(&mut self, key: &DpKey, new: BTreeMap<String, Contribution>) {
        let old = match self.sessions.get_mut(key) {
            Some(s) => std::mem::take(&mut s.contributes),
            None => return,
        };
        let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        let mut changed = Vec::new();
        for svc in names {
            if old.get(svc) == new.get(svc) {
                continue;
            }
            let k = (key.0.clone(), svc.clone());
            let entry = self.services.entry(k.clone()).or_default();
            match new.get(svc) {
                Some(c) => {
                    entry.by_dp.insert(key.1.clone(), c.clone());
                }
                None => {
                    entry.by_dp.remove(&key.1);
                }
            }
            if entry.by_dp.is_empty() && entry.subscribers.is_empty() {
                self.services.remove(&k);
            }
            changed.push(k);
        }
        if let Some(s) = self.sessions.get_mut(key) {
            s.contributes = new;
        }
        for k in changed {
            self.touched(&k, true);
        }
    }

    /// Service `k` changed (`local`: its local instances or declarations; else another
    /// zone's offer): wake its subscribers, the mesh's virtual-outbound sessions and, for a
    /// local change, the zone ingresses and the writer; refresh its VIPs.
    fn touched(&mut self, k: &SvcKey, local: bool) {
        let mut wake: Vec<DpKey> = Vec::new();
        if let Some(e) = self.services.get(k) {
            wake.extend(e.subscribers.iter().map(|s| (k.0.clone(), s.clone())));
        }
        if let Some(m) = self.meshes.get(&k.0) {
            wake.extend(m.virtual_sessions.iter().map(|s| (k.0.clone(), s.clone())));
        }
        if local {
            wake.extend(self.ingresses.iter().cloned());
            self.dirty_services.insert(k.clone());
            self.writer.notify_one();
        } else if self.requires_egress(&k.0) {
            // Another zone's offer: the egresses' routes to it.
            wake.extend(self.egresses.keys().cloned());
        }
        for w in wake {
            if let Some(s) = self.sessions.get_mut(&w) {
                s.pending.services.insert(k.clone());
                s.wake();
            }
        }
        self.refresh_vips(k);
    }

    /// One store event (or a listed resource): route it by kind.
    pub fn apply(&mut self, key: &Key, version: u64, resource: Option<&Resource>) {
        match key.kind {
            Kind::Dataplane => {
                let dp: DpKey = (key.mesh_str().to_string(), key.name.clone());
                self.dataplane_changed(&dp, version, resource);
            }
            Kind::ZoneIngress => self.zone_ingress_changed(key, resource),
            Kind::MeshService => self.mesh_service_changed(key, resource),
            k if in_mesh_context(k) => self.mesh_resource_changed(key, resource),
            _ => {}
        }
    }

    /// After a (re)list of every followed kind: forget what is gone, take in what is there.
    pub fn resync(&mut self, all: &[Resource]) {
        self.reset_meshes();
        let present: HashSet<Key> = all.iter().map(Resource::key).collect();
        let gone: Vec<DpKey> = self
            .dp_declares
            .keys()
            .filter(|k| !present.contains(&Key::new(Kind::Dataplane, Some(&k.0), &k.1)))
            .cloned()
            .collect();
        for k in gone {
            self.declared_changed(&k, None);
        }
        let gone: Vec<Key> = self
            .remote_keys
            .keys()
            .filter(|k| !present.contains(k))
            .cloned()
            .collect();
        for k in gone {
            self.mesh_service_changed(&k, None);
        }
        let gone: Vec<Key> = self
            .remote_ingress_zone
            .keys()
            .map(|n| Key::new(Kind::ZoneIngress, None, n))
            .filter(|k| !present.contains(k))
            .collect();
        for k in gone {
            self.zone_ingress_changed(&k, None);
        }
        for r in all {
            self.apply(&r.key(), r.meta.version, Some(r));
        }
    }

    /// A Dataplane changed in the store (`None`: deleted). Its declarations count for the
    /// managed MeshServices and VIPs; for a dataplane with a session here, a deleted one has
    /// its session closed and a changed one is re-read.
    pub fn dataplane_changed(&mut self, key: &DpKey, version: u64, resource: Option<&Resource>) {
        self.declared_changed(key, resource);
        let Some(s) = self.sessions.get(key) else {
            return;
        };
        let Some(r) = resource else {
            s.close.close(format!(
                "dataplane {:?} of mesh {:?} was deleted from zone {}",
                key.1, key.0, self.zone
            ));
            self.remove_session(key);
            return;
        };
        // An event older than what the session registered with (the feed lags a little).
        if version < s.resource.meta.version || s.resource.same_content(r) {
            return;
        }
        let spec = spec_of(r);
        let wanted = spec.as_ref().map(wanted).unwrap_or_default();
        let contributes = spec
            .as_ref()
            .map(|sp| contributions(&self.zone, &key.1, sp))
            .unwrap_or_default();
        let old_wanted = std::mem::take(&mut self.sessions.get_mut(key).expect("checked").wanted);
        for svc in old_wanted.difference(&wanted) {
            if let Some(e) = self.services.get_mut(&(key.0.clone(), svc.clone())) {
                e.subscribers.remove(&key.1);
            }
        }
        for svc in wanted.difference(&old_wanted) {
            self.services
                .entry((key.0.clone(), svc.clone()))
                .or_default()
                .subscribers
                .insert(key.1.clone());
        }
        {
            let s = self.sessions.get_mut(key).expect("checked");
            for svc in old_wanted.difference(&wanted) {
                let k = (key.0.clone(), svc.clone());
                s.pending.services.remove(&k);
                // A virtual-outbound proxy keeps every service of the mesh.
                if !s.role.is_virtual() {
                    s.pending.removed.insert(svc.clone());
                }
            }
            for svc in wanted.difference(&old_wanted) {
                s.pending.services.insert((key.0.clone(), svc.clone()));
                s.pending.removed.remove(svc);
            }
            s.wanted = wanted;
            s.resource = r.clone();
            s.pending.view = true;
            s.wake();
        }
        self.set_contributions(key, contributes);
    }

    /// What a local Dataplane declares (every inbound, ready or not).
    fn declared_changed(&mut self, key: &DpKey, resource: Option<&Resource>) {
        let new = resource
            .and_then(spec_of)
            .map(|s| declarations(&s))
            .unwrap_or_default();
        let old = self.dp_declares.remove(key).unwrap_or_default();
        let mut changed = BTreeSet::new();
        for svc in old {
            if new.contains_key(&svc) {
                continue;
            }
            let k = (key.0.clone(), svc.clone());
            if let Some(d) = self.declared.get_mut(&k) {
                d.remove(&key.1);
                if d.is_empty() {
                    self.declared.remove(&k);
                }
            }
            changed.insert(svc);
        }
        if !new.is_empty() {
            self.dp_declares
                .insert(key.clone(), new.keys().cloned().collect());
        }
        for (svc, ports) in new {
            let d = self
                .declared
                .entry((key.0.clone(), svc.clone()))
                .or_default();
            if d.get(&key.1) != Some(&ports) {
                d.insert(key.1.clone(), ports);
                changed.insert(svc);
            }
        }
        for svc in changed {
            self.touched(&(key.0.clone(), svc), true);
        }
    }

    /// A MeshService changed: another zone's goes into the cross-zone state (and wakes the
    /// service's sessions); every one goes into its mesh's policy context.
    pub fn mesh_service_changed(&mut self, key: &Key, resource: Option<&Resource>) {
        let old = self.remote_keys.remove(key).and_then(|(k, zone)| {
            let zones = self.remote.get_mut(&k)?;
            let r = zones.remove(&zone);
            if zones.is_empty() {
                self.remote.remove(&k);
            }
            r.map(|r| (k, zone, r))
        });
        let mut new = None;
        if let Some(r) = resource
            && let Some(zone) = r.labels.get(ZONE_LABEL).filter(|z| **z != self.zone)
        {
            match serde_json::from_value::<MeshServiceSpec>(r.spec.clone()) {
                Ok(spec) => {
                    let service = spec
                        .selector
                        .dataplane_tags
                        .get(SERVICE_TAG)
                        .cloned()
                        .unwrap_or_else(|| {
                            r.name
                                .strip_suffix(&format!(".{zone}"))
                                .unwrap_or(&r.name)
                                .to_string()
                        });
                    let remote = Remote {
                        instances: spec.status.map_or(0, |s| s.instances),
                        ports: spec
                            .ports
                            .iter()
                            .map(|p| {
                                (
                                    u32::from(p.port.0),
                                    p.app_protocol.as_ref().map(|a| protocol_name(Some(a))),
                                )
                            })
                            .collect(),
                    };
                    let k = (key.mesh_str().to_string(), service);
                    self.remote
                        .entry(k.clone())
                        .or_default()
                        .insert(zone.clone(), remote.clone());
                    self.remote_keys
                        .insert(key.clone(), (k.clone(), zone.clone()));
                    new = Some((k, zone.clone(), remote));
                }
                Err(e) => tracing::warn!(
                    mesh = key.mesh_str(),
                    name = %key.name,
                    error = %e,
                    "another zone's MeshService does not parse: ignored for cross-zone endpoints"
                ),
            }
        }
        if old != new {
            let touched: BTreeSet<SvcKey> = old.into_iter().chain(new).map(|(k, _, _)| k).collect();
            for k in touched {
                self.touched(&k, false);
            }
        }
        self.mesh_resource_changed(key, resource);
    }

    /// A ZoneIngress changed: another zone's is where this zone's proxies reach that zone's
    /// services; the sessions of the services that zone offers are woken.
    pub fn zone_ingress_changed(&mut self, key: &Key, resource: Option<&Resource>) {
        let name = key.name.clone();
        let old_zone = self.remote_ingress_zone.remove(&name);
        let old = old_zone.as_ref().and_then(|z| {
            let list = self.remote_ingresses.get_mut(z)?;
            let a = list.remove(&name);
            if list.is_empty() {
                self.remote_ingresses.remove(z);
            }
            a.map(|a| (z.clone(), a))
        });
        let mut new = None;
        if let Some(r) = resource
            && let Some(zone) = r.labels.get(ZONE_LABEL).filter(|z| **z != self.zone)
        {
            match serde_json::from_value::<ZoneIngressSpec>(r.spec.clone()) {
                Ok(spec) => {
                    let n = &spec.networking;
                    let address = n
                        .advertised_address
                        .as_ref()
                        .unwrap_or(&n.address)
                        .0
                        .clone();
                    let port = u32::from(n.advertised_port.unwrap_or(n.port).0);
                    self.remote_ingresses
                        .entry(zone.clone())
                        .or_default()
                        .insert(name.clone(), (address.clone(), port));
                    self.remote_ingress_zone.insert(name.clone(), zone.clone());
                    new = Some((zone.clone(), (address, port)));
                }
                Err(e) => tracing::warn!(
                    name = %name,
                    error = %e,
                    "another zone's ZoneIngress does not parse: ignored"
                ),
            }
        }
        if old == new {
            return;
        }
        let zones: BTreeSet<String> = old.into_iter().chain(new).map(|(z, _)| z).collect();
        let concerned: Vec<SvcKey> = self
            .remote
            .iter()
            .filter(|(_, by_zone)| {
                by_zone
                    .iter()
                    .any(|(z, r)| zones.contains(z) && r.instances > 0)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in concerned {
            self.touched(&k, false);
        }
    }

    /// A resource of the policy context of `mesh` changed (`None`: deleted): every session
    /// of the mesh re-resolves its view. A MeshService whose status alone changed does not
    /// count (the policies do not read it).
    pub fn mesh_resource_changed(&mut self, key: &Key, resource: Option<&Resource>) {
        let mesh = match key.kind {
            Kind::Mesh => key.name.clone(),
            _ => key.mesh_str().to_string(),
        };
        let m = self.meshes.entry(mesh.clone()).or_default();
        let same_policy_input = key.kind == Kind::MeshService
            && match (m.resources.get(key), resource) {
                (Some(old), Some(new)) => without_status(old) == without_status(new),
                _ => false,
            };
        match resource {
            Some(r) => {
                m.resources.insert(key.clone(), r.clone());
            }
            None => {
                m.resources.remove(key);
            }
        }
        let mut egress_routing_changed = false;
        if key.kind == Kind::Mesh {
            let before = m.spec.as_ref().is_some_and(zone_egress_routing);
            m.spec = resource.and_then(|r| serde_json::from_value(r.spec.clone()).ok());
            egress_routing_changed = before != m.spec.as_ref().is_some_and(zone_egress_routing);
        }
        m.snapshot = None;
        if !same_policy_input {
            self.invalidate_views(Some(&mesh));
        }
        if key.kind == Kind::MeshExternalService {
            let k = (mesh.clone(), key.name.clone());
            self.touched(&k, false);
            self.wake_egresses([k]);
        } else if key.kind == Kind::Mesh || key.kind == Kind::MeshTrafficPermission {
            // The permissions (and defaultDeny) the egresses enforce for this mesh.
            let all: Vec<SvcKey> = self
                .externals(&mesh)
                .into_keys()
                .map(|x| (mesh.clone(), x))
                .collect();
            if key.kind == Kind::Mesh {
                // mTLS on or off changes whether proxies get the egress as endpoint.
                for k in &all {
                    self.touched(k, false);
                }
            }
            self.wake_egresses(all);
        }
        if egress_routing_changed {
            // Other zones' services now go through the egress, or no longer do: the proxies'
            // endpoints change, and the egresses get (or lose) the routes.
            let remote: Vec<SvcKey> = self
                .remote
                .keys()
                .filter(|k| k.0 == mesh)
                .cloned()
                .collect();
            for k in &remote {
                self.touched(k, false);
            }
            self.wake_egresses(remote);
        }
    }

    /// The MeshExternalServices of `mesh`, by name.
    pub fn externals(&self, mesh: &str) -> BTreeMap<String, MeshExternalServiceSpec> {
        let Some(m) = self.meshes.get(mesh) else {
            return BTreeMap::new();
        };
        m.resources
            .iter()
            .filter(|(k, _)| k.kind == Kind::MeshExternalService)
            .filter_map(|(k, r)| {
                serde_json::from_value(r.spec.clone())
                    .ok()
                    .map(|spec| (k.name.clone(), spec))
            })
            .collect()
    }

    fn external(&self, k: &SvcKey) -> Option<MeshExternalServiceSpec> {
        let r = self.meshes.get(&k.0)?.resources.get(&Key::new(
            Kind::MeshExternalService,
            Some(&k.0),
            &k.1,
        ))?;
        serde_json::from_value(r.spec.clone()).ok()
    }

    /// Every external service of every mesh.
    fn all_externals(&self) -> Vec<SvcKey> {
        let mut out = Vec::new();
        for (mesh, m) in &self.meshes {
            for k in m.resources.keys() {
                if k.kind == Kind::MeshExternalService {
                    out.push((mesh.clone(), k.name.clone()));
                }
            }
        }
        out.sort();
        out
    }

    /// Whether `mesh` requires cross-zone traffic to leave through the zone egress
    /// (`Mesh.spec.routing.zoneEgress`).
    pub fn requires_egress(&self, mesh: &str) -> bool {
        self.meshes
            .get(mesh)
            .and_then(|m| m.spec.as_ref())
            .is_some_and(zone_egress_routing)
    }

    /// Whether the egresses get a set for `k`: a MeshExternalService, or another zone's
    /// service of a mesh that requires the egress (its routes).
    fn egress_wants(&self, k: &SvcKey) -> bool {
        self.external(k).is_some() || (self.requires_egress(&k.0) && self.remote.contains_key(k))
    }

    /// Every set the egresses get: external services, then other zones' services of the
    /// meshes that require the egress.
    fn egress_services(&self) -> Vec<SvcKey> {
        let mut out = self.all_externals();
        let mut routes: Vec<SvcKey> = self
            .remote
            .keys()
            .filter(|k| self.requires_egress(&k.0) && self.external(k).is_none())
            .cloned()
            .collect();
        routes.sort();
        out.extend(routes);
        out
    }

    /// The egresses have to be sent these external services again.
    fn wake_egresses(&mut self, services: impl IntoIterator<Item = SvcKey>) {
        let services: Vec<SvcKey> = services.into_iter().collect();
        if services.is_empty() {
            return;
        }
        for key in self.egresses.keys() {
            if let Some(s) = self.sessions.get_mut(key) {
                s.pending.services.extend(services.iter().cloned());
                s.wake();
            }
        }
    }

    /// An egress came or went: every external service's endpoints changed for proxies, and
    /// so did other zones' services in the meshes that require the egress.
    fn egresses_changed(&mut self) {
        if !self.egresses.is_empty() {
            self.no_egress_logged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        let routes: Vec<SvcKey> = self
            .remote
            .keys()
            .filter(|k| self.requires_egress(&k.0))
            .cloned()
            .collect();
        for k in self.all_externals().into_iter().chain(routes) {
            self.touched(&k, false);
        }
    }

    /// Forget every mesh's policy context (before a full re-list).
    pub fn reset_meshes(&mut self) {
        for m in self.meshes.values_mut() {
            m.resources.clear();
            m.snapshot = None;
            m.spec = None;
        }
        self.invalidate_views(None);
    }

    fn invalidate_views(&mut self, mesh: Option<&str>) {
        for (k, s) in self.sessions.iter_mut() {
            if matches!(s.role, Role::Proxy { .. }) && mesh.is_none_or(|m| m == k.0) {
                s.pending.view = true;
                s.wake();
            }
        }
    }

    /// The service in each zone that has it: this zone when a local Dataplane declares it or
    /// serves it, other zones when their MeshService is here.
    fn zones_of(&self, k: &SvcKey) -> BTreeMap<String, ZoneInfo> {
        let mut out = BTreeMap::new();
        let declared = self.declared.get(k);
        let online = self.services.get(k).filter(|e| !e.by_dp.is_empty());
        if declared.is_some() || online.is_some() {
            let mut info = ZoneInfo {
                instances: online.map_or(0, |e| e.by_dp.len() as u32),
                ports: BTreeMap::new(),
            };
            let mut per_port: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
            for ports in declared.into_iter().flat_map(|d| d.values()) {
                for (p, proto) in ports {
                    per_port.entry(*p).or_default().insert(proto.clone());
                }
            }
            for c in online.into_iter().flat_map(|e| e.by_dp.values()) {
                for e in &c.endpoints {
                    per_port
                        .entry(e.port)
                        .or_default()
                        .extend(c.protocols.iter().cloned());
                }
            }
            info.ports = per_port
                .iter()
                .map(|(p, protos)| (*p, agreed(protos).unwrap_or_else(|| "tcp".into())))
                .collect();
            out.insert(self.zone.clone(), info);
        }
        for (zone, r) in self.remote.get(k).into_iter().flatten() {
            out.insert(
                zone.clone(),
                ZoneInfo {
                    instances: r.instances,
                    ports: r
                        .ports
                        .iter()
                        .map(|(p, a)| (*p, a.clone().unwrap_or_else(|| "tcp".into())))
                        .collect(),
                },
            );
        }
        out
    }

    /// Recompute the VIPs of service `k`; wake the mesh's virtual-outbound sessions when its
    /// part of the table changed.
    fn refresh_vips(&mut self, k: &SvcKey) {
        let (mesh, svc) = k;
        let zones = self.zones_of(k);
        let mut vips = Vec::new();
        if zones.is_empty()
            && let Some(ext) = self.external(k)
        {
            // An external service: `<name>.mesh` on its port (it runs in no zone).
            let name = DnsName::new(svc, None).to_string();
            match self.vips.allocate(mesh, &name) {
                Ok(address) => vips.push(pb::Vip {
                    name,
                    address: address.to_string(),
                    service: svc.clone(),
                    zone: String::new(),
                    ports: vec![u32::from(ext.matcher.port.0)],
                }),
                Err(e) => {
                    tracing::error!(mesh = %mesh, name = %name, error = %e, "no VIP for an external service")
                }
            }
        } else if !zones.is_empty() {
            let all: BTreeSet<u32> = zones
                .values()
                .flat_map(|z| z.ports.keys().copied())
                .collect();
            let mut names = vec![(DnsName::new(svc, None), String::new(), all)];
            for (z, info) in &zones {
                names.push((
                    DnsName::new(svc, Some(z)),
                    z.clone(),
                    info.ports.keys().copied().collect(),
                ));
            }
            for (name, zone, ports) in names {
                let name = name.to_string();
                match self.vips.allocate(mesh, &name) {
                    Ok(address) => vips.push(pb::Vip {
                        name,
                        address: address.to_string(),
                        service: svc.clone(),
                        zone,
                        ports: ports.into_iter().collect(),
                    }),
                    Err(e) => {
                        tracing::error!(mesh = %mesh, name = %name, error = %e, "no VIP for a mesh DNS name")
                    }
                }
            }
        }
        let m = self.meshes.entry(mesh.clone()).or_default();
        if m.vips.get(svc).map_or(&[][..], Vec::as_slice) == vips.as_slice() {
            return;
        }
        if vips.is_empty() {
            m.vips.remove(svc);
        } else {
            m.vips.insert(svc.clone(), vips);
        }
        let wake: Vec<String> = m.virtual_sessions.iter().cloned().collect();
        for name in wake {
            if let Some(s) = self.sessions.get_mut(&(mesh.clone(), name)) {
                s.pending.vips = true;
                s.wake();
            }
        }
        self.writer.notify_one();
    }

    /// The mesh's VIP table, services in name order.
    pub fn vip_table(&self, mesh: &str) -> Vec<pb::Vip> {
        self.meshes
            .get(mesh)
            .map(|m| m.vips.values().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether service `k` exists anywhere (locally declared or served, or another zone's).
    fn known(&self, k: &SvcKey) -> bool {
        self.external(k).is_some()
            || self.declared.contains_key(k)
            || self.services.get(k).is_some_and(|e| !e.by_dp.is_empty())
            || self.remote.contains_key(k)
    }

    /// Every service of the mesh, local or remote.
    fn mesh_services(&self, mesh: &str) -> BTreeSet<String> {
        let local = self.local_services();
        let remote = self.remote.keys();
        local
            .iter()
            .chain(remote)
            .filter(|k| k.0 == mesh)
            .map(|k| k.1.clone())
            .chain(self.externals(mesh).into_keys())
            .collect()
    }

    /// Every local service of every mesh (declared by a Dataplane in the store, or served).
    fn local_services(&self) -> BTreeSet<SvcKey> {
        self.declared
            .keys()
            .cloned()
            .chain(
                self.services
                    .iter()
                    .filter(|(_, e)| !e.by_dp.is_empty())
                    .map(|(k, _)| k.clone()),
            )
            .collect()
    }

    /// The endpoint set of service `k` as `role` gets it.
    fn endpoints(&self, k: &SvcKey, role: Role) -> pb::ServiceEndpoints {
        if let Some(ext) = self.external(k) {
            return self.external_endpoints(k, &ext, role);
        }
        let (protocols, mut endpoints) = self
            .services
            .get(k)
            .map(ServiceEntry::local)
            .unwrap_or_default();
        if role == Role::Egress {
            // The egress's routes: other zones' ingresses only (it passes this zone's
            // proxies' connections through to them).
            endpoints.clear();
        }
        let declared = || {
            let all: BTreeSet<&String> = self
                .declared
                .get(k)
                .into_iter()
                .flat_map(|d| d.values().flat_map(|p| p.values()))
                .collect();
            agreed(all)
        };
        let remote = self.remote.get(k);
        let remote_protocol = || {
            remote
                .into_iter()
                .flat_map(|z| z.values())
                .flat_map(|r| r.ports.values())
                .find_map(Clone::clone)
        };
        let protocol = agreed(&protocols)
            .or_else(declared)
            .or_else(remote_protocol)
            .unwrap_or_else(|| "tcp".to_string());
        let via_egress = matches!(role, Role::Proxy { .. }) && self.requires_egress(&k.0);
        if via_egress {
            endpoints.extend(self.through_egress(k, remote));
        } else if matches!(role, Role::Proxy { .. }) || role == Role::Egress {
            for (zone, r) in remote.into_iter().flatten() {
                if r.instances == 0 {
                    continue;
                }
                for (name, (address, port)) in self.remote_ingresses.get(zone).into_iter().flatten()
                {
                    endpoints.push(pb::Endpoint {
                        address: address.clone(),
                        port: *port,
                        dataplane: name.clone(),
                        zone: zone.clone(),
                        tags: [
                            (SERVICE_TAG.to_string(), k.1.clone()),
                            (ZONE_LABEL.to_string(), zone.clone()),
                        ]
                        .into_iter()
                        .collect(),
                        weight: r.instances,
                        server_identity: String::new(),
                    });
                }
            }
        }
        pb::ServiceEndpoints {
            service: k.1.clone(),
            mesh: if matches!(role, Role::Ingress | Role::Egress) {
                k.0.clone()
            } else {
                String::new()
            },
            protocol,
            endpoints,
            external: None,
        }
    }

    /// A proxy's endpoints for the other zones of `k` when its mesh requires the egress: per
    /// zone Z with instances and an ingress, each of this zone's egresses, with `zone` = Z
    /// (the proxy sends Z's SNI and treats them as remote) and no `server_identity` (the
    /// TLS goes through the egress to Z's backend). None, logged once, without an egress.
    fn through_egress(
        &self,
        k: &SvcKey,
        remote: Option<&BTreeMap<String, Remote>>,
    ) -> Vec<pb::Endpoint> {
        let zones: Vec<(&String, u32)> = remote
            .into_iter()
            .flatten()
            .filter(|(z, r)| {
                r.instances > 0 && self.remote_ingresses.get(*z).is_some_and(|i| !i.is_empty())
            })
            .map(|(z, r)| (z, r.instances))
            .collect();
        if zones.is_empty() {
            return Vec::new();
        }
        if self.egresses.is_empty() {
            let first = self
                .no_egress_logged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(k.0.clone());
            if first {
                tracing::warn!(mesh = %k.0, zone = %self.zone, "no endpoints in other zones: the mesh requires cross-zone traffic to leave through the zone egress (routing.zoneEgress) and no zone egress is connected to this zone (run `weft-ingress run --mode egress`)");
            }
            return Vec::new();
        }
        let mut out = Vec::new();
        for (zone, instances) in zones {
            for ((_, name), (address, port)) in &self.egresses {
                out.push(pb::Endpoint {
                    address: address.clone(),
                    port: *port,
                    dataplane: name.clone(),
                    zone: zone.clone(),
                    tags: [
                        (SERVICE_TAG.to_string(), k.1.clone()),
                        (ZONE_LABEL.to_string(), zone.clone()),
                    ]
                    .into_iter()
                    .collect(),
                    weight: instances,
                    server_identity: String::new(),
                });
            }
        }
        out
    }

    /// The endpoint set of MeshExternalService `k`: for the egress, the external endpoints,
    /// how to reach them and the permissions; for a proxy, this zone's egresses (none when
    /// the zone has no egress or the mesh has mTLS off: the egress identifies callers by
    /// their certificate).
    fn external_endpoints(
        &self,
        k: &SvcKey,
        ext: &MeshExternalServiceSpec,
        role: Role,
    ) -> pb::ServiceEndpoints {
        use weft_core::spec::service::{ExternalProtocol, VerificationMode};
        let protocol = match ext.matcher.protocol {
            ExternalProtocol::Http => "http",
            ExternalProtocol::Http2 => "http2",
            ExternalProtocol::Grpc => "grpc",
            ExternalProtocol::Tcp | ExternalProtocol::Tls => "tcp",
        }
        .to_string();
        let spec = self.mesh_spec(&k.0).unwrap_or_default();
        let mtls = spec
            .mtls
            .as_ref()
            .is_some_and(|m| m.enabled_backend.is_some());
        if role == Role::Egress {
            let resources: Vec<Resource> = self
                .meshes
                .get(&k.0)
                .map(|m| m.resources.values().cloned().collect())
                .unwrap_or_default();
            let permissions =
                weft_core::policy::resolve_external(&k.0, &k.1, Some(&self.zone), &resources)
                    .ok()
                    .and_then(|v| serde_json::to_string(&v).ok())
                    .unwrap_or_default();
            let tls = ext.tls.as_ref().filter(|t| t.enabled);
            let verification = tls.and_then(|t| t.verification.as_ref());
            return pb::ServiceEndpoints {
                service: k.1.clone(),
                mesh: k.0.clone(),
                protocol,
                endpoints: ext
                    .endpoints
                    .iter()
                    .map(|e| pb::Endpoint {
                        address: e.address.0.clone(),
                        port: u32::from(e.port.0),
                        weight: 1,
                        ..pb::Endpoint::default()
                    })
                    .collect(),
                external: Some(pb::ExternalService {
                    tls: tls.is_some(),
                    server_name: verification
                        .and_then(|v| v.server_name.clone())
                        .unwrap_or_default(),
                    verification_mode: match verification.and_then(|v| v.mode) {
                        None | Some(VerificationMode::Secured) => "Secured",
                        Some(VerificationMode::SkipSan) => "SkipSAN",
                        Some(VerificationMode::SkipCa) => "SkipCA",
                        Some(VerificationMode::SkipAll) => "SkipAll",
                    }
                    .to_string(),
                    permissions_json: permissions,
                    default_deny: spec.default_deny.unwrap_or(mtls),
                }),
            };
        }
        let mut endpoints = Vec::new();
        if !mtls {
            tracing::warn!(mesh = %k.0, service = %k.1, "MeshExternalService: no endpoints: mesh has mTLS off, and the zone egress identifies callers by their mTLS certificate (enable mtls on the Mesh)");
        } else if self.egresses.is_empty() {
            tracing::warn!(mesh = %k.0, service = %k.1, zone = %self.zone, "MeshExternalService: no endpoints: no zone egress is connected to this zone (run `weft-ingress run --mode egress`)");
        } else {
            let identity =
                weft_core::pki::SpiffeId::new(&k.0, &weft_core::names::egress_identity(&self.zone))
                    .map(|i| i.to_string())
                    .unwrap_or_default();
            for ((_, name), (address, port)) in &self.egresses {
                endpoints.push(pb::Endpoint {
                    address: address.clone(),
                    port: *port,
                    dataplane: name.clone(),
                    zone: self.zone.clone(),
                    tags: [(SERVICE_TAG.to_string(), k.1.clone())]
                        .into_iter()
                        .collect(),
                    weight: 1,
                    server_identity: identity.clone(),
                });
            }
        }
        pb::ServiceEndpoints {
            service: k.1.clone(),
            mesh: String::new(),
            protocol,
            endpoints,
            external: None,
        }
    }

    /// Take what session `id` of `key` has to send (and clear it); `None` when the session
    /// is gone or nothing is pending.
    pub fn take(&mut self, key: &DpKey, id: u64) -> Option<Plan> {
        let s = self.sessions.get_mut(key).filter(|s| s.id == id)?;
        if s.pending.is_empty() {
            return None;
        }
        let mut pending = std::mem::take(&mut s.pending);
        let role = s.role;
        let wanted = s.wanted.clone();
        let resource = s.resource.clone();
        let sent_view = s.sent.view_json.clone();
        let sent_services = if pending.full {
            BTreeMap::new()
        } else {
            s.sent.services.clone()
        };
        let mesh = &key.0;
        let names: Vec<SvcKey> = if pending.full {
            match role {
                Role::Ingress => self.local_services().into_iter().collect(),
                Role::Egress => self.egress_services(),
                Role::Proxy { virtual_outbounds } => {
                    let mut n: BTreeSet<String> = wanted.clone();
                    if virtual_outbounds {
                        n.extend(self.mesh_services(mesh));
                    }
                    n.into_iter().map(|s| (mesh.clone(), s)).collect()
                }
            }
        } else {
            let mut out = Vec::new();
            let pending_services = std::mem::take(&mut pending.services);
            let mut readd = Vec::new();
            for k in pending_services {
                if role == Role::Egress {
                    if self.egress_wants(&k) {
                        out.push(k);
                    } else {
                        // (The session sends the removal only when the egress has the name.)
                        // Removals name no mesh: the egress drops the name from every mesh,
                        // so the others' sets of that name go again in the same update.
                        readd.extend(
                            self.egress_services()
                                .into_iter()
                                .filter(|o| o.1 == k.1 && o.0 != k.0),
                        );
                        pending.removed.insert(k.1.clone());
                    }
                    continue;
                }
                // A service gone from the mesh that the proxy does not declare.
                if role.is_virtual() && !wanted.contains(&k.1) && !self.known(&k) {
                    pending.removed.insert(k.1.clone());
                } else {
                    out.push(k);
                }
            }
            for k in readd {
                if !out.contains(&k) {
                    out.push(k);
                }
            }
            pending.services = out.iter().cloned().collect();
            out
        };
        let services = names.iter().map(|k| self.endpoints(k, role)).collect();
        let mesh_resources = if matches!(role, Role::Proxy { .. }) && (pending.view || pending.full)
        {
            let m = self.meshes.entry(key.0.clone()).or_default();
            Some(
                m.snapshot
                    .get_or_insert_with(|| Arc::new(m.resources.values().cloned().collect()))
                    .clone(),
            )
        } else {
            None
        };
        let vips =
            (role.is_virtual() && (pending.full || pending.vips)).then(|| self.vip_table(&key.0));
        Some(Plan {
            pending,
            resource,
            role,
            mesh_resources,
            services,
            sent_view,
            sent_services,
            vips,
        })
    }

    /// Put back what [`Index::take`] took but could not be sent (without waking anyone).
    pub fn restore(&mut self, key: &DpKey, id: u64, pending: Pending) {
        if let Some(s) = self.sessions.get_mut(key).filter(|s| s.id == id) {
            s.pending.full |= pending.full;
            s.pending.view |= pending.view;
            s.pending.vips |= pending.vips;
            s.pending.services.extend(pending.services);
            s.pending.removed.extend(pending.removed);
        }
    }

    /// Record an update sent to session `id` of `key`.
    pub fn sent(&mut self, key: &DpKey, id: u64, update: &pb::Update) {
        let Some(s) = self.sessions.get_mut(key).filter(|s| s.id == id) else {
            return;
        };
        if update.full {
            s.sent.services.clear();
        }
        if let Some(v) = &update.view_json {
            s.sent.view_json = Some(v.clone());
        }
        // As the receiver applies them: removals first, by name from every mesh (an
        // ingress's or egress's sets are recorded under their own mesh), then the sets.
        for svc in &update.removed_services {
            s.sent.services.retain(|(_, name), _| name != svc);
        }
        for svc in &update.services {
            s.sent.services.insert(sent_key(&key.0, svc), svc.clone());
        }
        s.insight.last_sent_nonce = update.nonce;
    }

    /// Apply `f` to the insight and sent record of session `id` of `key`, if it is current.
    pub fn with_session<T>(
        &mut self,
        key: &DpKey,
        id: u64,
        f: impl FnOnce(&mut Insight, &mut Sent) -> T,
    ) -> Option<T> {
        let s = self.sessions.get_mut(key).filter(|s| s.id == id)?;
        s.insight.last_seen = Some(SystemTime::now());
        Some(f(&mut s.insight, &mut s.sent))
    }

    /// The insight and sent config of `key`: `(online, insight, sent)`.
    pub fn lookup(&self, key: &DpKey) -> Option<(bool, Insight, Sent)> {
        if let Some(s) = self.sessions.get(key) {
            return Some((true, s.insight.clone(), s.sent.clone()));
        }
        self.past
            .get(key)
            .map(|(i, s)| (false, i.clone(), s.clone()))
    }

    /// Close every session (shutdown).
    pub fn close_all(&mut self, reason: &str) {
        for s in self.sessions.values() {
            s.close.close(reason.to_string());
        }
    }

    /// The spec of the MeshService the zone maintains for local service `k`, `None` when no
    /// local Dataplane declares it any more.
    fn desired_service(&self, k: &SvcKey) -> Option<Value> {
        let info = self.zones_of(k).remove(&self.zone)?;
        if info.ports.is_empty() {
            return None;
        }
        let ports: Vec<Value> = info
            .ports
            .iter()
            .map(|(p, proto)| json!({"port": p, "appProtocol": proto}))
            .collect();
        Some(json!({
            "selector": {"dataplaneTags": {SERVICE_TAG: k.1}},
            "ports": ports,
            "status": {"instances": info.instances},
        }))
    }

    /// What the writer has to do now: the managed MeshServices of the services that changed,
    /// and `vips.json` when the table changed (after releasing names unused for longer than
    /// the retention, as of `now`, unix seconds).
    pub fn take_writes(&mut self, now: u64) -> Writes {
        let services = std::mem::take(&mut self.dirty_services)
            .into_iter()
            .map(|k| {
                let d = self.desired_service(&k);
                (k, d)
            })
            .collect();
        let in_use: BTreeSet<vip::Name> = self
            .meshes
            .iter()
            .flat_map(|(m, st)| {
                st.vips
                    .values()
                    .flatten()
                    .map(move |v| (m.clone(), v.name.clone()))
            })
            .collect();
        let released = self.vips.sweep(&in_use, now);
        if !released.is_empty() {
            tracing::info!(?released, "VIPs released after the retention");
        }
        let vips_json = self.vips.take_dirty().then(|| self.vips.to_json());
        Writes {
            services,
            vips_json,
        }
    }

    /// A write of [`Index::take_writes`] failed: do it again on the next round.
    pub fn write_failed(&mut self, service: Option<SvcKey>, vips: bool) {
        if let Some(k) = service {
            self.dirty_services.insert(k);
        }
        if vips {
            self.vips.mark_dirty();
        }
    }

    /// This zone's VIP of `<service>.mesh` in `mesh`.
    pub fn vip_of(&self, mesh: &str, service: &str) -> Option<String> {
        self.vips
            .get(mesh, &DnsName::new(service, None).to_string())
            .map(|a| a.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mk_dataplane(name: &str, serves: &str, calls: &[&str], port: u16) -> Resource {
        let outbound: Vec<_> = calls
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"port": 20000 + i, "tags": {SERVICE_TAG: s}}))
            .collect();
        let mut r = Resource::new(
            Kind::Dataplane,
            Some("default"),
            name,
            BTreeMap::new(),
            json!({"networking": {"address": "10.0.0.1", "inbound": [{"port": port, "tags": {SERVICE_TAG: serves}}], "outbound": outbound}}),
        )
        .unwrap();
        r.meta.version = 1;
        r
    }

    const PROXY: Role = Role::Proxy {
        virtual_outbounds: false,
    };

    fn key(name: &str) -> DpKey {
        ("default".to_string(), name.to_string())
    }

    #[test]
    fn only_subscribers_of_a_changed_service_get_it() {
        let mut ix = Index::new("east");
        let web = ix.register(
            mk_dataplane("web-1", "web", &["api", "db"], 8080),
            PROXY,
            "web",
            "",
        );
        let plan = ix.take(&key("web-1"), web.id).unwrap();
        assert!(plan.pending.full);
        assert_eq!(plan.services.len(), 2);
        assert!(plan.services.iter().all(|s| s.endpoints.is_empty()));
        assert!(ix.take(&key("web-1"), web.id).is_none());

        // api registers: web gets api only; an unrelated service wakes nobody.
        let api = ix.register(mk_dataplane("api-1", "api", &[], 9090), PROXY, "api", "");
        let plan = ix.take(&key("web-1"), web.id).unwrap();
        assert!(!plan.pending.full && !plan.pending.view);
        assert_eq!(plan.services.len(), 1);
        assert_eq!(plan.services[0].service, "api");
        assert_eq!(plan.services[0].endpoints[0].port, 9090);
        assert_eq!(plan.services[0].endpoints[0].zone, "east");
        ix.register(
            mk_dataplane("other-1", "other", &[], 7070),
            PROXY,
            "other",
            "",
        );
        assert!(ix.take(&key("web-1"), web.id).is_none());

        // api goes away: its endpoints are withdrawn.
        assert!(ix.unregister(&key("api-1"), api.id));
        let plan = ix.take(&key("web-1"), web.id).unwrap();
        assert_eq!(plan.services[0].service, "api");
        assert!(plan.services[0].endpoints.is_empty());
        // A stale id does not unregister a newer session.
        assert!(!ix.unregister(&key("web-1"), web.id + 100));
    }

    #[test]
    fn a_second_session_closes_the_first_and_not_ready_inbounds_are_left_out() {
        let mut ix = Index::new("east");
        let a = ix.register(mk_dataplane("web-1", "web", &[], 8080), PROXY, "web", "");
        let b = ix.register(mk_dataplane("web-1", "web", &[], 8080), PROXY, "web", "");
        assert!(a.close.token.is_cancelled());
        assert!(
            a.close.reason().contains("replaced"),
            "{}",
            a.close.reason()
        );
        assert!(!b.close.token.is_cancelled());
        assert!(
            !ix.unregister(&key("web-1"), a.id),
            "the old session's end changes nothing"
        );
        assert_eq!(ix.online(), 1);

        let mut r = mk_dataplane("web-1", "web", &[], 8080);
        r.spec["networking"]["inbound"][0]["health"] = json!({"ready": false});
        let c = contributions("east", "web-1", &serde_json::from_value(r.spec).unwrap());
        assert!(c.is_empty());
    }

    #[test]
    fn a_dataplane_change_moves_subscriptions() {
        let mut ix = Index::new("east");
        let web = ix.register(
            mk_dataplane("web-1", "web", &["api"], 8080),
            PROXY,
            "web",
            "",
        );
        ix.take(&key("web-1"), web.id).unwrap();
        let mut r = mk_dataplane("web-1", "web", &["db"], 8080);
        r.meta.version = 2;
        ix.dataplane_changed(&key("web-1"), 2, Some(&r));
        let plan = ix.take(&key("web-1"), web.id).unwrap();
        assert!(plan.pending.view);
        assert_eq!(plan.pending.removed, BTreeSet::from(["api".to_string()]));
        assert_eq!(plan.services[0].service, "db");
        ix.dataplane_changed(&key("web-1"), 3, None);
        assert!(web.close.token.is_cancelled());
        assert_eq!(ix.online(), 0);
    }

    fn mk(kind: Kind, mesh: Option<&str>, name: &str, spec: Value) -> Resource {
        let mut r = Resource::new(kind, mesh, name, BTreeMap::new(), spec).unwrap();
        r.meta.version = 1;
        r
    }

    fn mk_egress(name: &str, port: u16) -> Resource {
        mk(
            Kind::ZoneEgress,
            None,
            name,
            json!({"networking": {"address": "10.0.0.9", "port": port}}),
        )
    }

    #[test]
    fn external_services_go_through_the_egress() {
        let mut ix = Index::new("east");
        let mesh = mk(
            Kind::Mesh,
            None,
            "default",
            json!({"mtls": {"enabledBackend": "ca", "backends": [{"name": "ca", "type": "builtin"}]}}),
        );
        let ext = mk(
            Kind::MeshExternalService,
            Some("default"),
            "httpbin",
            json!({"match": {"type": "HostnameGenerator", "port": 80, "protocol": "http"},
                   "endpoints": [{"address": "httpbin.org", "port": 443}],
                   "tls": {"enabled": true}}),
        );
        ix.resync(&[mesh, ext]);
        let web = ix.register(
            mk_dataplane("web-1", "web", &["httpbin"], 8080),
            PROXY,
            "web",
            "t",
        );
        // No egress yet: the proxy gets the service, with no endpoint.
        let plan = ix.take(&key("web-1"), web.id).unwrap();
        let set = plan
            .services
            .iter()
            .find(|s| s.service == "httpbin")
            .unwrap();
        assert!(set.endpoints.is_empty(), "{set:?}");
        assert_eq!(set.protocol, "http");

        let eg = ix.register(
            mk_egress("egress-1", 10002),
            Role::Egress,
            "zone-egress.east",
            "t",
        );
        // The proxy is woken with the egress as the endpoint, to be verified as the egress.
        let plan = ix.take(&key("web-1"), web.id).unwrap();
        let set = plan
            .services
            .iter()
            .find(|s| s.service == "httpbin")
            .unwrap();
        assert_eq!(set.endpoints.len(), 1);
        let ep = &set.endpoints[0];
        assert_eq!((ep.address.as_str(), ep.port), ("10.0.0.9", 10002));
        assert_eq!(ep.server_identity, "spiffe://default/zone-egress.east");
        assert_eq!(ep.zone, "east");

        // The egress gets the external endpoints, TLS and the permissions.
        let plan = ix.take(&egress_key("egress-1"), eg.id).unwrap();
        assert!(plan.pending.full);
        assert!(plan.mesh_resources.is_none());
        assert_eq!(plan.services.len(), 1);
        let set = &plan.services[0];
        assert_eq!(
            (set.mesh.as_str(), set.service.as_str()),
            ("default", "httpbin")
        );
        assert_eq!(set.endpoints[0].address, "httpbin.org");
        let x = set.external.as_ref().unwrap();
        assert!(x.tls);
        assert!(x.default_deny, "mTLS on: deny by default");
        assert_eq!(x.verification_mode, "Secured");

        // A permission for the external service wakes the egress with new rules.
        let mtp = mk(
            Kind::MeshTrafficPermission,
            Some("default"),
            "allow-web",
            json!({"targetRef": {"kind": "MeshExternalService", "name": "httpbin"},
                   "from": [{"targetRef": {"kind": "MeshService", "name": "web"},
                             "default": {"action": "Allow"}}]}),
        );
        ix.apply(&mtp.key(), 1, Some(&mtp));
        let plan = ix.take(&egress_key("egress-1"), eg.id).unwrap();
        let x = plan.services[0].external.as_ref().unwrap();
        let view: weft_core::policy::InboundView =
            serde_json::from_str(&x.permissions_json).unwrap();
        assert_eq!(
            view.allows("web", &BTreeMap::new(), true),
            weft_core::spec::policies::Action::Allow
        );

        // The external service deleted: the egress is told to remove it.
        let k = Key::new(Kind::MeshExternalService, Some("default"), "httpbin");
        ix.apply(&k, 2, None);
        let plan = ix.take(&egress_key("egress-1"), eg.id).unwrap();
        assert!(plan.services.is_empty());
        assert!(plan.pending.removed.contains("httpbin"));

        // The egress gone: proxies lose it.
        let ext = mk(
            Kind::MeshExternalService,
            Some("default"),
            "httpbin",
            json!({"match": {"type": "HostnameGenerator", "port": 80, "protocol": "http"},
                   "endpoints": [{"address": "httpbin.org", "port": 80}]}),
        );
        ix.apply(&ext.key(), 3, Some(&ext));
        let _ = ix.take(&key("web-1"), web.id);
        assert!(ix.unregister(&egress_key("egress-1"), eg.id));
        let plan = ix.take(&key("web-1"), web.id).unwrap();
        let set = plan
            .services
            .iter()
            .find(|s| s.service == "httpbin")
            .unwrap();
        assert!(set.endpoints.is_empty());
    }
}
