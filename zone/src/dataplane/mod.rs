//! The data-plane API (`proto/weft/dataplane/v1/dataplane.proto`, `docs/dataplane-api.md`):
//! proxies (weft-dp) register here over TLS, get their certificates, and receive their
//! configuration (the resolved policy view and the endpoints of the services they call) as
//! it changes.
//!
//! Pieces: [`tls`] (the server's certificate, kept in the data directory), [`index`] (who is
//! online, endpoints, subscriptions and what each session still has to be sent: synchronous,
//! behind one lock), [`Hub`] (the shared state, the Hello checks, the store's change feed
//! follower) and the per-stream session loop, and [`insight`] (`/_inspect/dataplanes*` and
//! the `weft_dataplane_*` metrics).

pub mod index;
pub mod insight;
pub mod tls;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use weft_core::spec::{DataplaneSpec, MeshSpec, SERVICE_TAG};
use weft_core::store::{self, ListQuery, Store};
use weft_core::token::Scope;
use weft_core::{Key, Kind, Resource};
use weft_global::api::Plane;
use weft_proto::dataplane::v1 as pb;

use index::{DpKey, Index, Role};

/// Largest message accepted from or sent to a proxy.
pub const MAX_MESSAGE: usize = 16 << 20;
/// How long a new stream may take to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keep-alive: ping every proxy connection this often ...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// ... and drop it when a ping is not answered within this.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Store changes arriving within this window go out in one update.
pub const COALESCE: Duration = Duration::from_millis(5);
const FEED_BATCH: usize = 1000;
/// Changes reaching the writer within this window go out in one round of store writes.
pub const WRITE_COALESCE: Duration = Duration::from_millis(50);
/// The writer also wakes this often, to release VIPs past their retention.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

type ZoneStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ZoneMessage, Status>> + Send>>;

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub updates_sent: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub certificates_issued: AtomicU64,
    pub sessions_refused: AtomicU64,
}

/// Everything the data-plane API shares: the index, the store, the zone's CAs and token
/// trust. Cheap to clone through `Arc`.
pub struct Hub {
    zone: String,
    store: Arc<dyn Store>,
    identity: Arc<crate::identity::Identity>,
    trust: Arc<crate::trust::Trust>,
    cfg: crate::config::Dataplane,
    /// When this zone started: the warm-up counts from here.
    started: tokio::time::Instant,
    /// Where `vips.json` is kept.
    data_dir: PathBuf,
    /// Wakes the writer task (managed MeshServices, `vips.json`).
    writer: Arc<tokio::sync::Notify>,
    index: Mutex<Index>,
    pub counters: Counters,
}

impl Hub {
    pub fn new(
        zone: &str,
        store: Arc<dyn Store>,
        identity: Arc<crate::identity::Identity>,
        trust: Arc<crate::trust::Trust>,
        cfg: crate::config::Dataplane,
        data_dir: PathBuf,
        vips: crate::vip::Allocator,
    ) -> Arc<Hub> {
        let index = Index::with_vips(zone, vips);
        Arc::new(Hub {
            zone: zone.to_string(),
            store,
            identity,
            trust,
            cfg,
            started: tokio::time::Instant::now(),
            data_dir,
            writer: index.writer(),
            index: Mutex::new(index),
            counters: Counters::default(),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Proxies connected now.
    pub fn online(&self) -> usize {
        self.index().online()
    }

    /// Serve the data-plane API over TLS on `listener` until `shutdown`, following the
    /// store's change feed meanwhile.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: tls::Material,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        let follower = tokio::spawn(
            self.clone()
                .follow(shutdown.clone())
                .instrument(tracing::info_span!("dataplane-feed")),
        );
        let writer = tokio::spawn(
            self.clone()
                .write_loop(shutdown.clone())
                .instrument(tracing::info_span!("zone-writer")),
        );
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        tracing::info!(%addr, ca_file = ?tls.ca_file, "data-plane API listening (proxies trust the CA file with --zone-ca-file)");
        let closing = shutdown.clone();
        let hub = self.clone();
        let result = tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .add_service(
                pb::dataplane_discovery_server::DataplaneDiscoveryServer::new(Service {
                    hub: self,
                    shutdown: shutdown.clone(),
                })
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            )
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                closing.cancelled().await;
                hub.index()
                    .close_all("the zone control plane is shutting down");
            })
            .await;
        follower.abort();
        writer.abort();
        result?;
        Ok(())
    }

    /// Follow the store's change feed: policy context per mesh and Dataplane changes go into
    /// the index, which wakes the sessions concerned. Event-driven: it sleeps on the
    /// store's revision watch, then waits [`COALESCE`] so a burst goes out as one update.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut watch = self.store.watch();
        let mut since = loop {
            match self.relist().await {
                Ok(rev) => break rev,
                Err(e) => {
                    tracing::warn!(error = %e, "listing the zone's resources for the data-plane API; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = watch.changed() => if changed.is_err() { return },
            }
            tokio::time::sleep(COALESCE).await;
            loop {
                match self.store.events_since(since, FEED_BATCH).await {
                    Ok(events) => {
                        let n = events.len();
                        if let Some(last) = events.last() {
                            since = last.revision;
                        }
                        let mut ix = self.index();
                        for ev in &events {
                            apply_event(&mut ix, ev);
                        }
                        drop(ix);
                        if n < FEED_BATCH {
                            break;
                        }
                    }
                    Err(store::Error::Compacted { .. }) => match self.relist().await {
                        Ok(rev) => since = rev,
                        Err(e) => {
                            tracing::warn!(error = %e, "re-listing after a compacted change feed");
                            break;
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the change feed; retrying on the next change");
                        break;
                    }
                }
            }
        }
    }

    /// Read the revision, then list every resource of the policy context into the index:
    /// following the feed after that revision misses nothing.
    async fn relist(&self) -> store::Result<u64> {
        let rev = self.store.revision().await?;
        let mut all = Vec::new();
        for kind in Kind::ALL.iter().copied().filter(|k| index::followed(*k)) {
            all.extend(store::list_all(&*self.store, ListQuery::all(kind)).await?);
        }
        self.index().resync(&all);
        Ok(rev)
    }

    /// Check a Hello: a Dataplane (a proxy) or a ZoneIngress (an ingress).
    async fn admit(&self, hello: &pb::Hello) -> Result<Admitted, Status> {
        let resource = parse_hello_resource(&hello.dataplane)?;
        match resource.kind {
            Kind::ZoneIngress => self.admit_gateway(hello, resource, Role::Ingress).await,
            Kind::ZoneEgress => self.admit_gateway(hello, resource, Role::Egress).await,
            _ => self.admit_dataplane(hello, resource).await,
        }
    }

    /// Check a zone ingress's or egress's Hello and register its ZoneIngress / ZoneEgress:
    /// check the zone token (scope `ingress` / `egress`, this zone), set `spec.zone`, then
    /// upsert it into the store as this zone's, from where KDS carries it to global (and, for
    /// an ingress, to the other zones). An egress's address is what this zone's proxies dial
    /// to reach MeshExternalServices.
    async fn admit_gateway(
        &self,
        hello: &pb::Hello,
        resource: Resource,
        role: Role,
    ) -> Result<Admitted, Status> {
        let (what, scope, service) = match role {
            Role::Ingress => ("ingress", Scope::Ingress, String::new()),
            Role::Egress => (
                "egress",
                Scope::Egress,
                weft_core::names::egress_identity(&self.zone),
            ),
            Role::Proxy { .. } => unreachable!("proxies are admitted by admit_dataplane"),
        };
        let name = resource.name.clone();
        let token = hello.token.trim();
        if token.is_empty() {
            return Err(Status::unauthenticated(format!(
                "zone {what} {name:?}: missing zone token (Hello.token; make one with `weftctl generate zone-token --zone {} --scope {what}`)",
                self.zone
            )));
        }
        self.trust
            .verify_zone_token(token, scope, &self.zone)
            .map_err(|e| match e {
                crate::trust::Error::NotYet => Status::unavailable(format!(
                    "zone {}: zone {what} token: cannot be checked yet (the zone has not obtained the token keys from global); retry once the zone is connected to global",
                    self.zone
                )),
                e => Status::unauthenticated(format!("zone {what} {name:?}: {e}")),
            })?;
        // The spec is valid and canonical (an object); only its `zone` is the zone's to set.
        let mut spec = resource.spec.clone();
        if let Some(z) = spec.get("zone").and_then(serde_json::Value::as_str)
            && z != self.zone
        {
            return Err(Status::invalid_argument(format!(
                "Hello.dataplane: spec.zone: {z:?} is not this zone {:?} (leave it out: the zone sets it)",
                self.zone
            )));
        }
        spec["zone"] = serde_json::Value::String(self.zone.clone());
        let plane = Plane::Zone {
            name: self.zone.clone(),
        };
        if let Some(stored) = self
            .store
            .get(&resource.key())
            .await
            .map_err(store_status)?
            && let Some(origin) = plane.foreign_origin(&stored)
        {
            return Err(Status::permission_denied(format!(
                "zone {what} {name:?} belongs to {origin}, not zone {} (give this {what} another name)",
                self.zone
            )));
        }
        let resource = Resource::new(resource.kind, None, &name, resource.labels, spec)
            .map_err(|e| Status::invalid_argument(format!("Hello.dataplane: {e}")))?;
        let outcome = self
            .store
            .apply(vec![plane.stamp(resource)], false)
            .await
            .map_err(store_status)?
            .pop()
            .ok_or_else(|| Status::internal("the store applied nothing"))?;
        Ok(Admitted {
            resource: outcome.resource().clone(),
            service,
            mtls: false,
            role,
        })
    }

    /// Check a proxy's Hello and register the Dataplane: parse and validate it, check the
    /// mesh and the token, then upsert it into the store (stamped as this zone's).
    async fn admit_dataplane(
        &self,
        hello: &pb::Hello,
        resource: Resource,
    ) -> Result<Admitted, Status> {
        let mesh = resource.mesh.clone().unwrap_or_default();
        let name = resource.name.clone();
        let spec: DataplaneSpec = serde_json::from_value(resource.spec.clone())
            .map_err(|e| Status::invalid_argument(format!("Hello.dataplane: spec: {e}")))?;
        let mesh_res = self
            .store
            .get(&Key::new(Kind::Mesh, None, &mesh))
            .await
            .map_err(store_status)?;
        let Some(mesh_res) = mesh_res else {
            return Err(Status::failed_precondition(format!(
                "dataplane {name:?}: mesh {mesh:?} does not exist in zone {} (create it on global; it reaches the zone over KDS)",
                self.zone
            )));
        };
        if hello.token.trim().is_empty() {
            return Err(Status::unauthenticated(format!(
                "dataplane {name:?} of mesh {mesh:?}: missing dataplane token (Hello.token; make one with `weftctl generate dataplane-token --mesh {mesh} --name {name} --service SERVICE`)"
            )));
        }
        // Every inbound serves the token's service: check the token against the first,
        // then the others against the token.
        let services: Vec<&String> = spec
            .networking
            .inbound
            .iter()
            .filter_map(|ib| ib.tags.get(SERVICE_TAG))
            .collect();
        let Some(service) = services.first().map(|s| s.to_string()) else {
            return Err(Status::invalid_argument(
                "Hello.dataplane: spec.networking.inbound: at least one inbound with a weft.io/service tag required",
            ));
        };
        let claims = self
            .trust
            .verify_dataplane(hello.token.trim(), &mesh, &name, &service)
            .map_err(|e| match e {
                crate::trust::Error::NotYet => Status::unavailable(format!(
                    "zone {}: {e}; retry once the zone is connected to global",
                    self.zone
                )),
                e => Status::unauthenticated(e.to_string()),
            })?;
        for (i, s) in services.iter().enumerate() {
            if **s != claims.service {
                return Err(Status::unauthenticated(format!(
                    "Hello.dataplane: spec.networking.inbound[{i}].tags.{SERVICE_TAG}: {s:?} is not the token's service {:?} (a dataplane token covers one service: give each service its own Dataplane and token)",
                    claims.service
                )));
            }
        }
        let plane = Plane::Zone {
            name: self.zone.clone(),
        };
        let stored = self
            .store
            .get(&resource.key())
            .await
            .map_err(store_status)?;
        if let Some(stored) = &stored
            && let Some(origin) = plane.foreign_origin(stored)
        {
            return Err(Status::permission_denied(format!(
                "dataplane {name:?} of mesh {mesh:?} belongs to {origin}, not zone {}",
                self.zone
            )));
        }
        let stamped = plane.stamp(resource);
        let outcome = self
            .store
            .apply(vec![stamped], false)
            .await
            .map_err(store_status)?
            .pop()
            .ok_or_else(|| Status::internal("the store applied nothing"))?;
        let mesh_spec: MeshSpec = serde_json::from_value(mesh_res.spec).unwrap_or_default();
        Ok(Admitted {
            resource: outcome.resource().clone(),
            service: claims.service,
            mtls: mesh_spec
                .mtls
                .as_ref()
                .is_some_and(|m| m.enabled_backend.is_some()),
            role: Role::Proxy {
                virtual_outbounds: hello.virtual_outbounds,
            },
        })
    }

    /// Answer a CertificateRequest of `service` in `mesh`.
    /// `answer_mesh` is echoed in the answer (set for egresses, which ask per mesh).
    async fn certificate(
        &self,
        mesh: &str,
        service: &str,
        csr_pem: &str,
        answer_mesh: &str,
    ) -> pb::zone_message::Msg {
        let err = |reason: String| {
            pb::zone_message::Msg::CertificateError(pb::CertificateError {
                reason,
                mesh: answer_mesh.to_string(),
            })
        };
        // The Mesh as stored now (the index may lag the store by a few milliseconds).
        let spec = match self.store.get(&Key::new(Kind::Mesh, None, mesh)).await {
            Ok(Some(r)) => serde_json::from_value::<MeshSpec>(r.spec).unwrap_or_default(),
            Ok(None) => {
                return err(format!(
                    "mesh {mesh:?} does not exist in zone {}",
                    self.zone
                ));
            }
            Err(e) => return err(format!("cannot read mesh {mesh:?} now: {e}")),
        };
        let Some(mtls) = spec.mtls.as_ref() else {
            return err(format!(
                "mesh {mesh:?} has mTLS off: no certificates are issued"
            ));
        };
        let Some(enabled) = mtls.enabled_backend.as_deref() else {
            return err(format!(
                "mesh {mesh:?} has mTLS off (no mtls.enabledBackend): no certificates are issued"
            ));
        };
        let Some(ca) = self.identity.get(mesh) else {
            return err(format!(
                "zone {} has no intermediate CA for mesh {mesh:?} yet (it obtains one from global over KDS); ask again later",
                self.zone
            ));
        };
        let valid_for = mtls
            .backends
            .iter()
            .find(|b| b.name.0 == enabled)
            .and_then(|b| b.dp_cert.as_ref())
            .and_then(|d| d.rotation.as_ref())
            .map_or(self.cfg.workload_cert_validity, |r| r.expiration.as_std());
        match ca.issue_workload(csr_pem, mesh, service, valid_for, SystemTime::now()) {
            Ok(cert) => {
                self.counters
                    .certificates_issued
                    .fetch_add(1, Ordering::Relaxed);
                pb::zone_message::Msg::Certificate(pb::Certificate {
                    chain_pem: cert.chain_pem,
                    roots_pem: vec![ca.root_pem().to_string()],
                    not_after_unix: unix(cert.not_after),
                    mesh: answer_mesh.to_string(),
                })
            }
            Err(e) => err(e.to_string()),
        }
    }
}

impl Hub {
    /// The session of zone ingress `name` ended: delete its ZoneIngress (as this session
    /// stored it) so that other zones stop routing here. When a new session of the same
    /// ingress registered meanwhile, its resource is put back.
    async fn ingress_gone(&self, kind: Kind, name: &str, version: u64) {
        let key = Key::new(kind, None, name);
        match self.store.delete(&key, Some(version)).await {
            Ok(()) | Err(store::Error::NotFound(_)) => {}
            // Changed since: a newer session stored it again.
            Err(store::Error::Conflict { .. }) => return,
            Err(e) => {
                tracing::warn!(ingress = %name, error = %e, "deleting the ZoneIngress of an ingress that went away");
                return;
            }
        }
        let session = match kind {
            Kind::ZoneEgress => index::egress_key(name),
            _ => (String::new(), name.to_string()),
        };
        let again = self.index().resource_of(&session);
        if let Some(r) = again
            && let Err(e) = self.store.apply(vec![r], false).await
        {
            tracing::warn!(ingress = %name, error = %e, "re-storing the ZoneIngress of a reconnected ingress");
        }
    }

    /// The writer task: on the index's signal (coalesced over [`WRITE_COALESCE`]) and every
    /// [`SWEEP_EVERY`], write the managed MeshServices that changed and `vips.json`. A
    /// failed write is retried on the next round (at most a second later).
    pub async fn write_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut retry = false;
        loop {
            let wait = if retry {
                Duration::from_secs(1)
            } else {
                SWEEP_EVERY
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.writer.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            tokio::time::sleep(WRITE_COALESCE).await;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let writes = self.index().take_writes(now);
            retry = false;
            for (k, desired) in writes.services {
                if let Err(e) = self.write_service(&k, desired).await {
                    tracing::warn!(mesh = %k.0, service = %k.1, error = %e, "writing the zone's MeshService; retrying");
                    self.index().write_failed(Some(k), false);
                    retry = true;
                }
            }
            if let Some(json) = writes.vips_json {
                let path = self.data_dir.join(crate::vip::FILE);
                let written = tokio::task::spawn_blocking(move || {
                    crate::dataplane::tls::write_atomic(&path, &json, 0o644)
                })
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r);
                if let Err(e) = written {
                    tracing::error!(error = %format!("{e:#}"), "writing vips.json; retrying (VIPs stay as they are meanwhile)");
                    self.index().write_failed(None, true);
                    retry = true;
                }
            }
        }
    }

    /// Bring the managed MeshService of `k` to `desired` (`None`: delete it). A MeshService
    /// without `weft.io/managed-by: weft-zone` is the user's and is left alone.
    async fn write_service(
        &self,
        k: &index::SvcKey,
        desired: Option<serde_json::Value>,
    ) -> store::Result<()> {
        let key = Key::new(Kind::MeshService, Some(&k.0), &k.1);
        let stored = self.store.get(&key).await?;
        if let Some(s) = &stored
            && s.labels
                .get(weft_core::MANAGED_BY_LABEL)
                .map(String::as_str)
                != Some(index::MANAGED_BY)
        {
            tracing::debug!(mesh = %k.0, service = %k.1, "a user-written MeshService exists: the zone generates none");
            return Ok(());
        }
        match (stored, desired) {
            (None, None) => Ok(()),
            (Some(s), None) => {
                tracing::info!(mesh = %k.0, service = %k.1, "no Dataplane declares the service any more: deleting its MeshService");
                match self.store.delete(&key, Some(s.meta.version)).await {
                    Err(store::Error::NotFound(_)) => Ok(()),
                    r => r,
                }
            }
            (stored, Some(spec)) => {
                let labels = [
                    (weft_core::ORIGIN_LABEL, "zone"),
                    (weft_core::ZONE_LABEL, self.zone.as_str()),
                    (weft_core::MANAGED_BY_LABEL, index::MANAGED_BY),
                ]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
                let r = match Resource::new(Kind::MeshService, Some(&k.0), &k.1, labels, spec) {
                    Ok(r) => r,
                    Err(e) => {
                        // Not retried: the same input gives the same answer.
                        tracing::warn!(mesh = %k.0, service = %k.1, error = %e, "the service's MeshService would be invalid: none generated");
                        return Ok(());
                    }
                };
                match stored {
                    Some(s) if s.same_content(&r) => Ok(()),
                    Some(s) => self.store.update(r, s.meta.version).await.map(drop),
                    None => self.store.create(r).await.map(drop),
                }
            }
        }
    }
}

/// Apply one change-feed event to the index.
fn apply_event(ix: &mut Index, ev: &store::Event) {
    ix.apply(&ev.key, ev.version, ev.resource.as_deref());
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn store_status(e: store::Error) -> Status {
    match e {
        store::Error::Invalid(i) => Status::invalid_argument(format!("Hello.dataplane: {i}")),
        store::Error::Backend(_) => Status::unavailable(e.to_string()),
        e => Status::internal(e.to_string()),
    }
}

/// `Hello.dataplane`: one Dataplane (proxies), ZoneIngress (ingresses) or ZoneEgress
/// (egresses) resource, YAML or JSON, validated like the API does.
pub fn parse_hello_resource(text: &str) -> Result<Resource, Status> {
    if text.trim().is_empty() {
        return Err(Status::invalid_argument(
            "Hello.dataplane is empty: send the Dataplane resource (type, name, mesh, spec) as YAML or JSON (a zone ingress sends its ZoneIngress)",
        ));
    }
    let mut docs = weft_core::document::parse(text)
        .map_err(|e| Status::invalid_argument(format!("Hello.dataplane: {e}")))?;
    if docs.len() != 1 {
        return Err(Status::invalid_argument(format!(
            "Hello.dataplane: expected one Dataplane resource, got {} documents",
            docs.len()
        )));
    }
    let r = docs.pop().expect("one");
    if !matches!(
        r.kind,
        Kind::Dataplane | Kind::ZoneIngress | Kind::ZoneEgress
    ) {
        return Err(Status::invalid_argument(format!(
            "Hello.dataplane: type: expected Dataplane (or ZoneIngress for a zone ingress, ZoneEgress for a zone egress), got {}",
            r.kind
        )));
    }
    Ok(r)
}

struct Admitted {
    resource: Resource,
    service: String,
    mtls: bool,
    role: Role,
}

/// The tonic service: one [`session`] per stream.
struct Service {
    hub: Arc<Hub>,
    shutdown: CancellationToken,
}

#[tonic::async_trait]
impl pb::dataplane_discovery_server::DataplaneDiscovery for Service {
    type StreamStream = ZoneStream;

    async fn stream(
        &self,
        req: Request<Streaming<pb::ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = req.remote_addr();
        let mut inbound = req.into_inner();
        let hub = &self.hub;
        let refused = |s: Status| {
            hub.counters
                .sessions_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(?peer, code = ?s.code(), reason = %s.message(), "refused a proxy's Hello");
            s
        };
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                refused(Status::deadline_exceeded(format!(
                    "no Hello within {}s: the first message of a stream must be Hello",
                    HELLO_TIMEOUT.as_secs()
                )))
            })??;
        let hello = match first.and_then(|m| m.msg) {
            Some(pb::proxy_message::Msg::Hello(h)) => h,
            other => {
                let got = match other {
                    None => "nothing",
                    Some(pb::proxy_message::Msg::Ack(_)) => "Ack",
                    Some(pb::proxy_message::Msg::Nack(_)) => "Nack",
                    Some(pb::proxy_message::Msg::CertificateRequest(_)) => "CertificateRequest",
                    Some(pb::proxy_message::Msg::Hello(_)) => unreachable!("matched above"),
                };
                return Err(refused(Status::invalid_argument(format!(
                    "the first message of a stream must be Hello, got {got}"
                ))));
            }
        };
        let admitted = hub.admit(&hello).await.map_err(refused)?;
        let role = admitted.role;
        let key: DpKey = match role {
            Role::Egress => index::egress_key(&admitted.resource.name),
            _ => (
                admitted.resource.mesh.clone().unwrap_or_default(),
                admitted.resource.name.clone(),
            ),
        };
        let hold = (hello.has_config && hub.started.elapsed() < hub.cfg.warmup)
            .then(|| hub.started + hub.cfg.warmup);
        let version = admitted.resource.meta.version;
        let reg = hub
            .index()
            .register(admitted.resource, role, &admitted.service, &hello.version);
        match role {
            Role::Ingress => {
                tracing::info!(ingress = %key.1, version = %hello.version, ?peer, "zone ingress registered")
            }
            Role::Egress => {
                tracing::info!(egress = %key.1, version = %hello.version, ?peer, "zone egress registered")
            }
            Role::Proxy { virtual_outbounds } => {
                tracing::info!(mesh = %key.0, dataplane = %key.1, service = %admitted.service, version = %hello.version, has_config = hello.has_config, virtual_outbounds, held = hold.is_some(), ?peer, "proxy registered")
            }
        }
        let (tx, rx) = mpsc::channel(16);
        let registered = pb::ZoneMessage {
            msg: Some(pb::zone_message::Msg::Registered(pb::Registered {
                zone: hub.zone.clone(),
                mesh: if role == Role::Egress {
                    String::new()
                } else {
                    key.0.clone()
                },
                name: key.1.clone(),
                mtls: admitted.mtls,
            })),
        };
        tx.try_send(Ok(registered)).expect("a new channel has room");
        let session = Session {
            hub: hub.clone(),
            key: key.clone(),
            role,
            stored_version: version,
            service: admitted.service,
            id: reg.id,
            notify: reg.notify,
            close: reg.close,
            hold,
            tx,
            nonce: 0,
        };
        let span = match role {
            Role::Ingress => tracing::info_span!("ingress", name = %key.1),
            Role::Egress => tracing::info_span!("egress", name = %key.1),
            Role::Proxy { .. } => tracing::info_span!("dataplane", mesh = %key.0, name = %key.1),
        };
        tokio::spawn(session.run(inbound, self.shutdown.clone()).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One proxy's stream after its Hello.
struct Session {
    hub: Arc<Hub>,
    /// (mesh, name) of a proxy; ("", name) of an ingress.
    key: DpKey,
    role: Role,
    /// The version of the Dataplane / ZoneIngress as this session stored it.
    stored_version: u64,
    service: String,
    id: u64,
    notify: Arc<tokio::sync::Notify>,
    close: Arc<index::Close>,
    /// Until when the first full update is held (zone warm-up).
    hold: Option<tokio::time::Instant>,
    tx: mpsc::Sender<Result<pb::ZoneMessage, Status>>,
    nonce: u64,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<pb::ProxyMessage>, shutdown: CancellationToken) {
        let ended = loop {
            let hold = self.hold;
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.tx.send(Err(Status::unavailable("the zone control plane is shutting down; reconnect"))).await;
                    break "zone shutting down".to_string();
                }
                _ = self.close.token.cancelled() => {
                    let reason = self.close.reason();
                    let _ = self.tx.send(Err(Status::aborted(reason.clone()))).await;
                    break reason;
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        if let Err(reason) = self.handle(m).await {
                            break reason;
                        }
                    }
                    Ok(None) => break "the proxy closed the stream".to_string(),
                    Err(s) => break format!("stream error: {}", s.message()),
                },
                _ = async { tokio::time::sleep_until(hold.expect("guarded")).await }, if hold.is_some() => {
                    tracing::info!("zone warm-up over: sending the held full update");
                    self.hold = None;
                    self.notify.notify_one();
                }
                _ = self.notify.notified(), if hold.is_none() => {
                    if let Err(reason) = self.push().await {
                        break reason;
                    }
                }
            }
        };
        let removed = self.hub.index().unregister(&self.key, self.id);
        if !removed {
            tracing::info!(reason = %ended, "session ended");
        } else if self.role == Role::Ingress {
            tracing::info!(reason = %ended, "zone ingress offline: removing its ZoneIngress (other zones stop routing to it)");
            self.hub
                .ingress_gone(Kind::ZoneIngress, &self.key.1, self.stored_version)
                .await;
        } else if self.role == Role::Egress {
            tracing::info!(reason = %ended, "zone egress offline: removing its ZoneEgress (proxies lose their route to external services)");
            self.hub
                .ingress_gone(Kind::ZoneEgress, &self.key.1, self.stored_version)
                .await;
        } else {
            tracing::info!(reason = %ended, "proxy offline: its endpoints are withdrawn");
        }
    }

    async fn send(&self, msg: pb::zone_message::Msg) -> Result<(), String> {
        self.tx
            .send(Ok(pb::ZoneMessage { msg: Some(msg) }))
            .await
            .map_err(|_| "the proxy went away".to_string())
    }

    async fn handle(&mut self, m: pb::ProxyMessage) -> Result<(), String> {
        use pb::proxy_message::Msg;
        let hub = self.hub.clone();
        let Some(msg) = m.msg else {
            return Ok(());
        };
        match msg {
            Msg::Hello(_) => {
                let _ = self
                    .tx
                    .send(Err(Status::invalid_argument(
                        "Hello was already sent on this stream (send it once, first)",
                    )))
                    .await;
                return Err("a second Hello".to_string());
            }
            Msg::Ack(a) => {
                hub.counters.acks.fetch_add(1, Ordering::Relaxed);
                hub.index().with_session(&self.key, self.id, |i, _| {
                    i.last_acked_nonce = i.last_acked_nonce.max(a.nonce);
                });
            }
            Msg::Nack(n) => {
                hub.counters.nacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(mesh = %self.key.0, dataplane = %self.key.1, nonce = n.nonce, reason = %n.reason, "proxy refused an update (NACK); it keeps its previous config");
                hub.index().with_session(&self.key, self.id, |i, _| {
                    i.last_nack = Some((n.nonce, n.reason.clone()));
                });
            }
            Msg::CertificateRequest(_) if self.role == Role::Ingress => {
                self.send(pb::zone_message::Msg::CertificateError(
                    pb::CertificateError {
                        reason: "zone ingresses pass TLS through and get no certificate".into(),
                        mesh: String::new(),
                    },
                ))
                .await?;
            }
            Msg::CertificateRequest(c) if self.role == Role::Egress => {
                let msg = if c.mesh.is_empty() {
                    pb::zone_message::Msg::CertificateError(pb::CertificateError {
                        reason: "CertificateRequest.mesh: empty (a zone egress asks for one certificate per mesh: name the mesh)".into(),
                        mesh: String::new(),
                    })
                } else {
                    hub.certificate(&c.mesh, &self.service, &c.csr_pem, &c.mesh)
                        .await
                };
                match &msg {
                    pb::zone_message::Msg::Certificate(cert) => tracing::info!(
                        mesh = %c.mesh, identity = %self.service, not_after = cert.not_after_unix,
                        "issued the zone egress a certificate"
                    ),
                    pb::zone_message::Msg::CertificateError(e) => {
                        tracing::info!(mesh = %c.mesh, reason = %e.reason, "no certificate for the zone egress")
                    }
                    _ => {}
                }
                self.send(msg).await?;
            }
            Msg::CertificateRequest(c) => {
                let msg = hub
                    .certificate(&self.key.0, &self.service, &c.csr_pem, "")
                    .await;
                match &msg {
                    pb::zone_message::Msg::Certificate(cert) => {
                        let id = weft_core::pki::SpiffeId::new(&self.key.0, &self.service)
                            .map(|i| i.to_string())
                            .unwrap_or_default();
                        let not_after =
                            UNIX_EPOCH + Duration::from_secs(cert.not_after_unix.max(0) as u64);
                        hub.index().with_session(&self.key, self.id, |_, s| {
                            s.certificate = Some((not_after, id));
                        });
                        tracing::info!(
                            not_after = cert.not_after_unix,
                            "issued a workload certificate"
                        );
                    }
                    pb::zone_message::Msg::CertificateError(e) => {
                        tracing::info!(reason = %e.reason, "no certificate for the proxy");
                    }
                    _ => {}
                }
                self.send(msg).await?;
            }
        }
        Ok(())
    }

    /// Send what is pending, if anything changed for this proxy.
    async fn push(&mut self) -> Result<(), String> {
        let Some(plan) = self.hub.index().take(&self.key, self.id) else {
            return Ok(());
        };
        let full = plan.pending.full;
        let view_json = match &plan.mesh_resources {
            Some(resources) => match weft_core::policy::resolve(&plan.resource, resources) {
                Ok(view) => match serde_json::to_string(&view) {
                    Ok(json) if full || plan.sent_view.as_deref() != Some(json.as_str()) => {
                        Some(json)
                    }
                    Ok(_) => None,
                    Err(e) => {
                        tracing::error!(error = %e, "serializing the resolved view");
                        None
                    }
                },
                Err(e) => {
                    tracing::error!(error = %e, "resolving the policies of the proxy");
                    None
                }
            },
            None => None,
        };
        if full && view_json.is_none() && matches!(plan.role, Role::Proxy { .. }) {
            // Without a view the proxy would refuse a full update: keep it pending for the
            // next change (a resolve error means a resource the store should not hold).
            self.hub.index().restore(&self.key, self.id, plan.pending);
            return Ok(());
        }
        let removed: Vec<String> = plan
            .pending
            .removed
            .iter()
            .filter(|s| {
                !full
                    && if plan.role == Role::Egress {
                        // An egress's sets are recorded under their own mesh.
                        plan.sent_services.keys().any(|(_, n)| n == *s)
                    } else {
                        plan.sent_services
                            .contains_key(&(self.key.0.clone(), (*s).clone()))
                    }
            })
            .cloned()
            .collect();
        // A set of a name removed in the same update goes again even when unchanged: the
        // removal (by name) takes that name out of every mesh of an ingress or egress.
        let services: Vec<pb::ServiceEndpoints> = plan
            .services
            .into_iter()
            .filter(|s| {
                full || removed.contains(&s.service)
                    || plan.sent_services.get(&index::sent_key(&self.key.0, s)) != Some(s)
            })
            .collect();
        if !full
            && view_json.is_none()
            && services.is_empty()
            && removed.is_empty()
            && plan.vips.is_none()
        {
            return Ok(());
        }
        self.nonce += 1;
        let update = pb::Update {
            nonce: self.nonce,
            full,
            view_json,
            services,
            removed_services: removed,
            vips_replace: plan.vips.is_some(),
            vips: plan.vips.unwrap_or_default(),
        };
        self.hub.index().sent(&self.key, self.id, &update);
        self.hub
            .counters
            .updates_sent
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            nonce = update.nonce,
            full,
            view = update.view_json.is_some(),
            services = ?update.services.iter().map(|s| s.service.as_str()).collect::<BTreeSet<_>>(),
            removed = ?update.removed_services,
            vips = update.vips_replace.then_some(update.vips.len()),
            "update sent"
        );
        self.send(pb::zone_message::Msg::Update(update)).await
    }
}
