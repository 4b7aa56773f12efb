//! The KDS server: zones dial global here (gRPC over TLS, zone token in the `authorization`
//! metadata). Each stream runs one of `weft_proto::driver`'s loops against global's store:
//! global is the sender on `GlobalToZone` and the receiver on `ZoneToGlobal`. Every stream
//! re-checks its token (revocation) and its zone (`Zone.spec.enabled`, deletion) every few
//! seconds and is cut off with a clear status when either fails. Per-zone insight (online,
//! last seen, counts, last NACK) is written to the store so every replica can report it.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use weft_core::kds::{Direction, Side};
use weft_core::store::{self, Store};
use weft_core::token::Scope;
use weft_core::{Key, Kind, ORIGIN_LABEL, Resource};
use weft_proto::driver::{self, Liveness, Stats};
use weft_proto::kds::v1 as pb;

use crate::kds_tls::Material;
use crate::tokens::Tokens;

/// How often a live stream re-checks its token and its zone.
pub const RECHECK: Duration = Duration::from_secs(2);
/// How often a stream's insight is written to the store.
pub const INSIGHT_EVERY: Duration = Duration::from_secs(5);
/// A zone not seen for this long is reported offline.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(30);
/// Largest KDS message accepted.
pub const MAX_MESSAGE: usize = 64 << 20;

#[derive(Clone)]
pub struct Server {
    store: Arc<dyn Store>,
    tokens: Arc<Tokens>,
    instance: String,
    live: Liveness,
    shutdown: CancellationToken,
}

/// What global knows of a zone's connection, kept in the store (system key
/// `zone-insight/<zone>`) by the replica that serves it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Insight {
    pub zone: String,
    pub connected: bool,
    pub connected_since: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    /// The zone's software version (from its Hello).
    pub version: String,
    /// Which global replica serves it.
    pub global_instance: String,
    /// Per kind, both directions: resources sent / acknowledged / refused.
    pub kinds: BTreeMap<String, KindCounts>,
    pub last_nack: Option<String>,
    /// The last time a stream of this zone ended, and why.
    pub last_disconnect: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KindCounts {
    pub sent: u64,
    pub acked: u64,
    pub nacked: u64,
}

impl Insight {
    pub fn key(zone: &str) -> String {
        format!("zone-insight/{zone}")
    }

    /// Online: a stream is connected and the zone was heard from recently.
    pub fn online(&self, now: DateTime<Utc>) -> bool {
        self.connected
            && self
                .last_seen
                .is_some_and(|t| (now - t).to_std().unwrap_or_default() < OFFLINE_AFTER)
    }
}

pub async fn read_insight(store: &dyn Store, zone: &str) -> store::Result<Option<Insight>> {
    Ok(store
        .system_get(&Insight::key(zone))
        .await?
        .and_then(|s| serde_json::from_str(&s).ok()))
}

type MessageStream = Pin<Box<dyn Stream<Item = Result<pb::Message, Status>> + Send>>;

impl Server {
    pub fn new(
        store: Arc<dyn Store>,
        tokens: Arc<Tokens>,
        instance: String,
        live: Liveness,
        shutdown: CancellationToken,
    ) -> Server {
        Server {
            store,
            tokens,
            instance,
            live,
            shutdown,
        }
    }

    /// Serve KDS over TLS on `listener` until shutdown.
    pub async fn serve(self, listener: TcpListener, tls: Material) -> anyhow::Result<()> {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        let shutdown = self.shutdown.clone();
        let addr = listener.local_addr()?;
        tracing::info!(%addr, fingerprint = %tls.fingerprint(), "KDS listening (zones pin this CA fingerprint or use kds-ca.pem)");
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .add_service(
                pb::kds_server::KdsServer::new(self)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await?;
        Ok(())
    }

    /// Authenticate a stream: a valid, unrevoked zone token for an enabled zone. Creates the
    /// `Zone` resource on the zone's first connection.
    async fn admit<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing zone token (authorization: Bearer <token>; make one with `weftctl generate zone-token --zone NAME`)"))?;
        let claims = self.tokens.verify(token).await.map_err(|e| {
            if e.is_transient() {
                Status::unavailable(format!("cannot check the zone token now: {e}"))
            } else {
                tracing::warn!(error = %e, "refused a zone");
                Status::unauthenticated(e.to_string())
            }
        })?;
        if claims.scope != Scope::Zone {
            return Err(Status::permission_denied(format!(
                "token {} is scoped to {:?}, not to a zone control plane",
                claims.jti, claims.scope
            )));
        }
        let zone = claims.zone().to_string();
        if let Some(claimed) = req
            .metadata()
            .get("weft-zone")
            .and_then(|v| v.to_str().ok())
            && claimed != zone
        {
            tracing::warn!(%zone, %claimed, "refused a zone whose token is for another zone");
            return Err(Status::permission_denied(format!(
                "the zone token is for zone {zone:?}, but this zone calls itself {claimed:?} (use a token issued for {claimed:?})"
            )));
        }
        self.check_zone(&zone, true).await?;
        Ok(zone)
    }

    /// The zone must exist (created here on first connection when `create`) and be enabled.
    async fn check_zone(&self, zone: &str, create: bool) -> Result<(), Status> {
        let key = Key::new(Kind::Zone, None, zone);
        let unavailable = |e: store::Error| Status::unavailable(format!("store: {e}"));
        match self.store.get(&key).await.map_err(unavailable)? {
            Some(z) => {
                if z.spec.get("enabled") == Some(&serde_json::Value::Bool(false)) {
                    return Err(Status::permission_denied(format!(
                        "zone {zone:?} is disabled (Zone.spec.enabled: false)"
                    )));
                }
                Ok(())
            }
            None if create => {
                let labels = BTreeMap::from([(ORIGIN_LABEL.to_string(), "global".to_string())]);
                let z = Resource::new(
                    Kind::Zone,
                    None,
                    zone,
                    labels,
                    serde_json::json!({"enabled": true}),
                )
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
                match self.store.create(z).await {
                    Ok(_) => tracing::info!(%zone, "zone joined: created its Zone resource"),
                    Err(store::Error::AlreadyExists(_)) => {}
                    Err(e) => return Err(unavailable(e)),
                }
                Ok(())
            }
            None => Err(Status::permission_denied(format!(
                "zone {zone:?} was deleted"
            ))),
        }
    }

    /// Run one stream in a task; the response carries its messages, then its end status.
    fn spawn_stream(
        &self,
        zone: String,
        token: String,
        dir: Direction,
        incoming: Streaming<pb::Message>,
    ) -> MessageStream {
        let (tx, rx) = mpsc::channel::<pb::Message>(match dir {
            Direction::GlobalToZone => 64,
            // The receiving end's acks must never block its reading.
            Direction::ZoneToGlobal => 1 << 16,
        });
        let (end_tx, end_rx) = oneshot::channel::<Status>();
        let this = self.clone();
        let span = tracing::info_span!("kds", %zone, dir = ?dir);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let status = this.run_stream(zone, token, dir, incoming, tx).await;
                let _ = end_tx.send(status);
            },
            span,
        ));
        let end = futures::stream::once(end_rx).filter_map(|s| async move {
            match s {
                Ok(status) if status.code() != tonic::Code::Ok => Some(Err(status)),
                _ => None,
            }
        });
        Box::pin(ReceiverStream::new(rx).map(Ok).chain(end))
    }

    async fn run_stream(
        &self,
        zone: String,
        token: String,
        dir: Direction,
        incoming: Streaming<pb::Message>,
        tx: mpsc::Sender<pb::Message>,
    ) -> Status {
        let stream = weft_core::kds::Stream::new(dir, &zone, Side::Global);
        let stats = Arc::new(Stats::default());
        let cancel = self.shutdown.child_token();
        tracing::info!("stream opened");
        let driver = {
            let (store, stats, cancel, instance, live) = (
                self.store.clone(),
                stats.clone(),
                cancel.clone(),
                self.instance.clone(),
                self.live,
            );
            async move {
                match dir {
                    Direction::GlobalToZone => {
                        driver::run_sender(
                            store, stream, &instance, incoming, tx, live, stats, cancel,
                        )
                        .await
                    }
                    Direction::ZoneToGlobal => {
                        driver::run_receiver(
                            store, stream, &instance, incoming, tx, live, stats, cancel,
                        )
                        .await
                    }
                }
            }
        };
        tokio::pin!(driver);
        let mut recheck = tokio::time::interval(RECHECK);
        // First report soon after the zone's Hello, then every few seconds.
        let mut insight = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_millis(300),
            INSIGHT_EVERY,
        );
        let status = loop {
            tokio::select! {
                r = &mut driver => break match r {
                    Ok(()) => Status::unavailable("global is shutting down"),
                    Err(e) => {
                        tracing::info!(error = %e, "stream ended");
                        Status::aborted(e.to_string())
                    }
                },
                _ = recheck.tick() => {
                    let verdict = match self.tokens.verify(&token).await {
                        Ok(_) => self.check_zone(&zone, false).await,
                        Err(e) if e.is_transient() => Ok(()),
                        Err(e) => Err(Status::unauthenticated(e.to_string())),
                    };
                    if let Err(s) = verdict {
                        tracing::warn!(reason = %s.message(), "cutting the zone off");
                        cancel.cancel();
                        break s;
                    }
                }
                _ = insight.tick() => self.write_insight(&zone, dir, &stats, true, None).await,
            }
        };
        cancel.cancel();
        self.write_insight(
            &zone,
            dir,
            &stats,
            false,
            Some(status.message().to_string()),
        )
        .await;
        status
    }

    /// Merge one stream's counters into the zone's insight in the store.
    async fn write_insight(
        &self,
        zone: &str,
        dir: Direction,
        stats: &Stats,
        connected: bool,
        ended: Option<String>,
    ) {
        let snap = stats.snapshot();
        let mut ins = read_insight(&*self.store, zone)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        let now = Utc::now();
        ins.zone = zone.to_string();
        ins.connected = connected;
        ins.global_instance = self.instance.clone();
        if let Some(peer) = &snap.peer {
            ins.version = peer.version.clone();
        }
        if let Some(at) = snap.connected_at {
            ins.connected_since =
                Some(now - chrono::Duration::from_std(at.elapsed()).unwrap_or_default());
        }
        // Opening the stream is hearing from the zone.
        if let Some(seen) = snap.last_seen.or(snap.connected_at) {
            ins.last_seen =
                Some(now - chrono::Duration::from_std(seen.elapsed()).unwrap_or_default());
        }
        let prefix = match dir {
            Direction::GlobalToZone => "to-zone",
            Direction::ZoneToGlobal => "from-zone",
        };
        ins.kinds.retain(|k, _| !k.starts_with(prefix));
        for (kind, k) in &snap.kinds {
            ins.kinds.insert(
                format!("{prefix}/{kind}"),
                KindCounts {
                    sent: k.sent,
                    acked: k.acked,
                    nacked: k.nacked,
                },
            );
        }
        if snap.last_nack.is_some() {
            ins.last_nack = snap.last_nack.clone();
        }
        if let Some(reason) = ended {
            ins.last_disconnect = Some(format!("{}: {reason}", now.to_rfc3339()));
        }
        match serde_json::to_string(&ins) {
            Ok(json) => {
                if let Err(e) = self.store.system_set(&Insight::key(zone), &json).await {
                    tracing::debug!(error = %e, "writing zone insight failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "encoding zone insight"),
        }
    }
}

#[tonic::async_trait]
impl pb::kds_server::Kds for Server {
    type GlobalToZoneStream = MessageStream;
    type ZoneToGlobalStream = MessageStream;

    async fn global_to_zone(
        &self,
        req: Request<Streaming<pb::Message>>,
    ) -> Result<Response<MessageStream>, Status> {
        let zone = self.admit(&req).await?;
        let token = bearer(&req);
        Ok(Response::new(self.spawn_stream(
            zone,
            token,
            Direction::GlobalToZone,
            req.into_inner(),
        )))
    }

    async fn zone_to_global(
        &self,
        req: Request<Streaming<pb::Message>>,
    ) -> Result<Response<MessageStream>, Status> {
        let zone = self.admit(&req).await?;
        let token = bearer(&req);
        Ok(Response::new(self.spawn_stream(
            zone,
            token,
            Direction::ZoneToGlobal,
            req.into_inner(),
        )))
    }

    async fn sign_intermediate(
        &self,
        req: Request<pb::SignIntermediateRequest>,
    ) -> Result<Response<pb::SignIntermediateResponse>, Status> {
        let zone = self.admit(&req).await?;
        let pb::SignIntermediateRequest { mesh, csr_pem } = req.into_inner();
        let issued = crate::mesh_ca::sign_intermediate(&*self.store, &mesh, &zone, &csr_pem)
            .await
            .map_err(|e| {
                tracing::warn!(%zone, %mesh, error = %e, "refused an intermediate CA");
                intermediate_status(&zone, e)
            })?;
        let not_after: DateTime<Utc> = issued.not_after.into();
        tracing::info!(%zone, %mesh, not_after = %not_after.to_rfc3339(), "issued an intermediate CA");
        Ok(Response::new(pb::SignIntermediateResponse {
            cert_pem: issued.cert_pem,
            root_pem: issued.root_pem,
            not_after_unix: not_after.timestamp(),
        }))
    }

    async fn get_trust(
        &self,
        req: Request<pb::GetTrustRequest>,
    ) -> Result<Response<pb::GetTrustResponse>, Status> {
        let zone = self.admit(&req).await?;
        let revoked = self.tokens.revoked().await.map_err(|e| {
            tracing::warn!(%zone, error = %e, "cannot read the token revocation log");
            Status::unavailable(format!("zone {zone}: {e}"))
        })?;
        Ok(Response::new(pb::GetTrustResponse {
            token_keys: self
                .tokens
                .verifying_keys()
                .iter()
                .map(|k| k.as_bytes().to_vec())
                .collect(),
            revoked_ids: revoked.into_iter().map(|r| r.jti).collect(),
        }))
    }
}

/// Why an intermediate was not signed, as the status the zone sees.
fn intermediate_status(zone: &str, e: crate::mesh_ca::Error) -> Status {
    use crate::mesh_ca::Error as E;
    use weft_core::pki::Error as P;
    let msg = format!("zone {zone}: {e}");
    match e {
        E::NoMesh(_) => Status::not_found(msg),
        E::NoMtls(_) | E::NotBuiltin { .. } => Status::failed_precondition(msg),
        E::Pki(P::Refused { .. }) => Status::permission_denied(msg),
        E::Pki(P::InvalidName { .. } | P::Malformed { .. }) => Status::invalid_argument(msg),
        E::Store(store::Error::Backend(_)) => Status::unavailable(msg),
        E::Pki(_) | E::BadSpec { .. } | E::BadStored { .. } | E::Store(_) => Status::internal(msg),
    }
}

fn bearer<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string()
}

/// Delete what zones that no longer exist owned. Runs on the leader only: on start and
/// whenever a `Zone` is deleted (and every minute, to catch up after a failover).
pub async fn cleanup_deleted_zones(store: &dyn Store) -> store::Result<usize> {
    let zones: std::collections::HashSet<String> =
        store::list_all(store, store::ListQuery::all(Kind::Zone))
            .await?
            .into_iter()
            .map(|z| z.name)
            .collect();
    let mut removed = 0;
    for kind in weft_core::kds::kinds(Direction::ZoneToGlobal) {
        let mut q = store::ListQuery::all(kind);
        q.selector = weft_core::ZONE_LABEL.parse().expect("valid selector");
        for r in store::list_all(store, q).await? {
            let owner = r
                .labels
                .get(weft_core::ZONE_LABEL)
                .cloned()
                .unwrap_or_default();
            if !zones.contains(&owner) {
                match store.delete(&r.key(), None).await {
                    Ok(()) | Err(store::Error::NotFound(_)) => removed += 1,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, "deleted resources of zones that no longer exist");
    }
    Ok(removed)
}
