//! The zone's view of its proxies, in plain synchronous code behind one lock (no I/O, no
//! `.await`): which dataplanes are online, the endpoints each contributes per service, which
//! sessions want which services, the policy resources per mesh, and what each session still
//! has to be sent (`Pending`). Events come in (a session registers or ends, a resource
//! changes); sessions are woken through their `Notify` and take a [`Plan`].
//!
//! Cost: a change of one dataplane touches the services it serves and wakes only their
//! subscribers; a policy change wakes the sessions of its mesh (each re-resolves its view).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use weft_core::spec::dataplane::Networking;
use weft_core::spec::{DataplaneSpec, MeshSpec, SERVICE_TAG};
use weft_core::{Key, Kind, Resource};
use weft_proto::dataplane::v1 as pb;

/// A dataplane: (mesh, name).
pub type DpKey = (String, String);

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

/// What a session still has to send.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pending {
    pub full: bool,
    pub view: bool,
    pub services: BTreeSet<String>,
    pub removed: BTreeSet<String>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        !self.full && !self.view && self.services.is_empty() && self.removed.is_empty()
    }
}

/// What the zone last sent a proxy, for `/_inspect/dataplanes/{mesh}/{name}/config` and to
/// send only what changed.
#[derive(Clone, Debug, Default)]
pub struct Sent {
    pub view_json: Option<String>,
    pub services: BTreeMap<String, pb::ServiceEndpoints>,
    /// (not after, SPIFFE ID) of the last certificate issued.
    pub certificate: Option<(SystemTime, String)>,
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
}

/// What a session sends next: taken from the index, computed outside the lock.
#[derive(Debug)]
pub struct Plan {
    pub pending: Pending,
    pub resource: Resource,
    /// The resources `policy::resolve` needs, when the view is to be (re)computed.
    pub mesh_resources: Option<Arc<Vec<Resource>>>,
    /// The endpoint sets of `pending.services` (all wanted when full) now.
    pub services: Vec<pb::ServiceEndpoints>,
    /// What was last sent.
    pub sent_view: Option<String>,
    pub sent_services: BTreeMap<String, pb::ServiceEndpoints>,
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
    services: HashMap<DpKey, ServiceEntry>,
    meshes: HashMap<String, MeshState>,
    /// The last insight and config of dataplanes whose session ended.
    past: HashMap<DpKey, (Insight, Sent)>,
}

/// Whether resources of `kind` go into a mesh's policy context.
pub fn in_mesh_context(kind: Kind) -> bool {
    kind == Kind::Mesh
        || kind.is_policy()
        || matches!(kind, Kind::MeshService | Kind::MeshExternalService)
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
        });
    }
    out
}

fn spec_of(r: &Resource) -> Option<DataplaneSpec> {
    serde_json::from_value(r.spec.clone()).ok()
}

impl ServiceEntry {
    /// The endpoint set as sent: dataplanes in name order; the protocol they agree on, tcp
    /// when they do not.
    fn build(&self, service: &str) -> pb::ServiceEndpoints {
        let mut protocols = BTreeSet::new();
        let mut endpoints = Vec::new();
        for c in self.by_dp.values() {
            protocols.extend(c.protocols.iter().cloned());
            endpoints.extend(c.endpoints.iter().cloned());
        }
        let protocol = if protocols.len() == 1 {
            protocols.into_iter().next().expect("one")
        } else {
            "tcp".to_string()
        };
        pb::ServiceEndpoints {
            service: service.to_string(),
            protocol,
            endpoints,
        }
    }
}

impl Index {
    pub fn new(zone: &str) -> Index {
        Index {
            zone: zone.to_string(),
            next_id: 0,
            sessions: HashMap::new(),
            services: HashMap::new(),
            meshes: HashMap::new(),
            past: HashMap::new(),
        }
    }

    /// Online sessions.
    pub fn online(&self) -> usize {
        self.sessions.len()
    }

    /// The Mesh's spec, when the zone has the Mesh.
    pub fn mesh_spec(&self, mesh: &str) -> Option<MeshSpec> {
        self.meshes.get(mesh).and_then(|m| m.spec.clone())
    }

    /// Register a session for the stored (stamped) Dataplane `resource`. A session already
    /// there for the same dataplane is closed and replaced.
    pub fn register(&mut self, resource: Resource, service: &str, version: &str) -> Registration {
        let key: DpKey = (
            resource.mesh.clone().unwrap_or_default(),
            resource.name.clone(),
        );
        if let Some(old) = self.remove_session(&key) {
            old.close(format!(
                "replaced by a newer session of dataplane {:?} in mesh {:?}",
                key.1, key.0
            ));
        }
        self.next_id += 1;
        let id = self.next_id;
        let notify = Arc::new(Notify::new());
        let close = Arc::new(Close::default());
        let now = SystemTime::now();
        let spec = spec_of(&resource);
        let wanted = spec.as_ref().map(wanted).unwrap_or_default();
        let contributes = spec
            .as_ref()
            .map(|s| contributions(&self.zone, &key.1, s))
            .unwrap_or_default();
        for s in &wanted {
            self.services
                .entry((key.0.clone(), s.clone()))
                .or_default()
                .subscribers
                .insert(key.1.clone());
        }
        let sent = self.past.remove(&key).map(|(_, s)| s).unwrap_or_default();
        self.sessions.insert(
            key.clone(),
            Session {
                id,
                resource,
                contributes: BTreeMap::new(),
                wanted,
                pending: Pending {
                    full: true,
                    view: true,
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
        let mut insight = s.insight;
        insight.last_seen = Some(SystemTime::now());
        self.past.insert(key.clone(), (insight, s.sent));
        Some(s.close)
    }

    /// Replace what `key` contributes, waking the subscribers of every service that changed.
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
            changed.push(svc.clone());
        }
        if let Some(s) = self.sessions.get_mut(key) {
            s.contributes = new;
        }
        for svc in changed {
            let subs: Vec<String> = self
                .services
                .get(&(key.0.clone(), svc.clone()))
                .map(|e| e.subscribers.iter().cloned().collect())
                .unwrap_or_default();
            for sub in subs {
                if let Some(s) = self.sessions.get_mut(&(key.0.clone(), sub)) {
                    s.pending.services.insert(svc.clone());
                    s.wake();
                }
            }
        }
    }

    /// A Dataplane changed in the store (`None`: deleted). Only dataplanes with a session
    /// here matter; a deleted one has its session closed.
    pub fn dataplane_changed(&mut self, key: &DpKey, version: u64, resource: Option<&Resource>) {
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
                s.pending.removed.insert(svc.clone());
                s.pending.services.remove(svc);
            }
            for svc in wanted.difference(&old_wanted) {
                s.pending.services.insert(svc.clone());
                s.pending.removed.remove(svc);
            }
            s.wanted = wanted;
            s.resource = r.clone();
            s.pending.view = true;
            s.wake();
        }
        self.set_contributions(key, contributes);
    }

    /// A resource of the policy context of `mesh` changed (`None`: deleted): every session
    /// of the mesh re-resolves its view.
    pub fn mesh_resource_changed(&mut self, key: &Key, resource: Option<&Resource>) {
        let mesh = match key.kind {
            Kind::Mesh => key.name.clone(),
            _ => key.mesh.clone().unwrap_or_default(),
        };
        let m = self.meshes.entry(mesh.clone()).or_default();
        match resource {
            Some(r) => {
                m.resources.insert(key.clone(), r.clone());
            }
            None => {
                m.resources.remove(key);
            }
        }
        if key.kind == Kind::Mesh {
            m.spec = resource.and_then(|r| serde_json::from_value(r.spec.clone()).ok());
        }
        m.snapshot = None;
        self.invalidate_views(Some(&mesh));
    }

    /// Forget every mesh's policy context (before a full re-list).
    pub fn reset_meshes(&mut self) {
        self.meshes.clear();
        self.invalidate_views(None);
    }

    fn invalidate_views(&mut self, mesh: Option<&str>) {
        for (k, s) in self.sessions.iter_mut() {
            if mesh.is_none_or(|m| m == k.0) {
                s.pending.view = true;
                s.wake();
            }
        }
    }

    /// Take what session `id` of `key` has to send (and clear it); `None` when the session
    /// is gone or nothing is pending.
    pub fn take(&mut self, key: &DpKey, id: u64) -> Option<Plan> {
        let s = self.sessions.get_mut(key).filter(|s| s.id == id)?;
        if s.pending.is_empty() {
            return None;
        }
        let pending = std::mem::take(&mut s.pending);
        let names: Vec<String> = if pending.full {
            s.wanted.iter().cloned().collect()
        } else {
            pending.services.iter().cloned().collect()
        };
        let resource = s.resource.clone();
        let sent_view = s.sent.view_json.clone();
        let sent_services = if pending.full {
            BTreeMap::new()
        } else {
            s.sent.services.clone()
        };
        let services = names
            .iter()
            .map(
                |svc| match self.services.get(&(key.0.clone(), svc.clone())) {
                    Some(e) => e.build(svc),
                    None => pb::ServiceEndpoints {
                        service: svc.clone(),
                        protocol: "tcp".to_string(),
                        endpoints: Vec::new(),
                    },
                },
            )
            .collect();
        let mesh_resources = if pending.view || pending.full {
            let m = self.meshes.entry(key.0.clone()).or_default();
            Some(
                m.snapshot
                    .get_or_insert_with(|| Arc::new(m.resources.values().cloned().collect()))
                    .clone(),
            )
        } else {
            None
        };
        Some(Plan {
            pending,
            resource,
            mesh_resources,
            services,
            sent_view,
            sent_services,
        })
    }

    /// Put back what [`Index::take`] took but could not be sent (without waking anyone).
    pub fn restore(&mut self, key: &DpKey, id: u64, pending: Pending) {
        if let Some(s) = self.sessions.get_mut(key).filter(|s| s.id == id) {
            s.pending.full |= pending.full;
            s.pending.view |= pending.view;
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
        for svc in &update.services {
            s.sent.services.insert(svc.service.clone(), svc.clone());
        }
        for svc in &update.removed_services {
            s.sent.services.remove(svc);
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

    fn key(name: &str) -> DpKey {
        ("default".to_string(), name.to_string())
    }

    #[test]
    fn only_subscribers_of_a_changed_service_get_it() {
        let mut ix = Index::new("east");
        let web = ix.register(
            mk_dataplane("web-1", "web", &["api", "db"], 8080),
            "web",
            "",
        );
        let plan = ix.take(&key("web-1"), web.id).unwrap();
        assert!(plan.pending.full);
        assert_eq!(plan.services.len(), 2);
        assert!(plan.services.iter().all(|s| s.endpoints.is_empty()));
        assert!(ix.take(&key("web-1"), web.id).is_none());

        // api registers: web gets api only; an unrelated service wakes nobody.
        let api = ix.register(mk_dataplane("api-1", "api", &[], 9090), "api", "");
        let plan = ix.take(&key("web-1"), web.id).unwrap();
        assert!(!plan.pending.full && !plan.pending.view);
        assert_eq!(plan.services.len(), 1);
        assert_eq!(plan.services[0].service, "api");
        assert_eq!(plan.services[0].endpoints[0].port, 9090);
        assert_eq!(plan.services[0].endpoints[0].zone, "east");
        ix.register(mk_dataplane("other-1", "other", &[], 7070), "other", "");
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
        let a = ix.register(mk_dataplane("web-1", "web", &[], 8080), "web", "");
        let b = ix.register(mk_dataplane("web-1", "web", &[], 8080), "web", "");
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
        let web = ix.register(mk_dataplane("web-1", "web", &["api"], 8080), "web", "");
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
}
