//! The zone session: one `DataplaneDiscovery.Stream` at a time over TLS (rustls, verifying
//! the zone's certificate against `--zone-ca-file`), kept up forever.
//!
//! Per session: send `Hello` (the zone token with scope `ingress`, re-read from its file at
//! every connection, and the ZoneIngress resource); on `Registered` take the zone's name; apply
//! each `Update` to the [`Routes`] all or nothing and answer `Ack`, or `Nack` with the reason
//! (the table then stays what it was). When the stream fails, reconnect with jittered
//! exponential backoff (`weft_core::kds::backoff`) and keep routing on the last table
//! meanwhile. Only a refusal of the very first session (bad token, invalid ZoneIngress) is
//! fatal: it will not fix itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use weft_proto::dataplane::v1 as pb;
use weft_proto::dataplane::v1::dataplane_discovery_client::DataplaneDiscoveryClient;
use weft_proto::dataplane::v1::proxy_message::Msg as ProxyMsg;
use weft_proto::dataplane::v1::zone_message::Msg as ZoneMsg;

use crate::metrics::Metrics;
use crate::table::Routes;

/// Full updates of a big zone (every service of every mesh) exceed tonic's default 4 MiB.
const MAX_MESSAGE: usize = 64 << 20;

/// Where the zone is and who this ingress is.
#[derive(Clone, Debug)]
pub struct Config {
    /// `https://HOST:PORT`.
    pub address: String,
    /// The CA of the zone's data-plane API certificate, PEM.
    pub ca_pem: String,
    /// Read again at every connection (tokens can be rotated in place).
    pub token_file: PathBuf,
    /// The ZoneIngress document, sent as is in `Hello`.
    pub resource: String,
    pub timing: Timing,
}

impl Config {
    pub fn new(cfg: &crate::config::Config) -> Config {
        Config {
            address: cfg.zone_address.clone(),
            ca_pem: cfg.zone_ca_pem.clone(),
            token_file: cfg.token_file.clone(),
            resource: cfg.resource.clone(),
            timing: Timing::default(),
        }
    }
}

/// The session's timers.
#[derive(Clone, Debug)]
pub struct Timing {
    pub connect_timeout: Duration,
    /// HTTP/2 pings, also while idle; the connection is dropped when one is not answered
    /// within `keepalive_timeout`.
    pub keepalive: Duration,
    pub keepalive_timeout: Duration,
    /// Reconnect delays: jittered exponential from `backoff_base` up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Connection failures are logged at most once per this period.
    pub log_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            log_every: Duration::from_secs(10),
        }
    }
}

/// What the zone said in `Registered`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub zone: String,
    pub name: String,
}

/// How far the ingress got; kept across sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub registered: Option<Registration>,
    /// A routing table was applied.
    pub has_table: bool,
}

impl Progress {
    /// What the ingress still needs before it can route; `None` when nothing.
    pub fn waiting_for(&self) -> Option<&'static str> {
        match (&self.registered, self.has_table) {
            (_, true) => None,
            (None, false) => Some("not registered with the zone yet"),
            (Some(_), false) => Some("no routing table from the zone yet"),
        }
    }
}

/// The session's state for `/ready`, `/config` and `run`.
#[derive(Debug, Default)]
pub struct Status {
    progress: watch::Sender<Progress>,
    connected: AtomicBool,
    acks: AtomicU64,
    nacks: AtomicU64,
}

impl Status {
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Registered with the zone on a live stream.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// `(acks, nacks)` sent so far.
    pub fn answers(&self) -> (u64, u64) {
        (
            self.acks.load(Ordering::Relaxed),
            self.nacks.load(Ordering::Relaxed),
        )
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        self.progress.send_if_modified(|p| {
            let before = p.clone();
            f(p);
            *p != before
        });
    }
}

/// How a session ended.
enum Ended {
    /// The zone answered with a status (a refusal, or the stream failed).
    Status(tonic::Status),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Ended {
    fn from(e: anyhow::Error) -> Self {
        Ended::Other(e)
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Status(s) => f.write_str(&describe(s)),
            Ended::Other(e) => write!(f, "{e:#}"),
        }
    }
}

/// `code: message`, and the cause of a transport failure.
fn describe(s: &tonic::Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// Logs something at most once per period, counting what it left out.
struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(left out since the last log)` when it is time to log.
    fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now < t + self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Check a zone address: `https://HOST:PORT`; returns the host (what the certificate must
/// name) and the port.
pub fn check_address(address: &str) -> anyhow::Result<(String, u16)> {
    let bad = |why: &str| {
        anyhow::anyhow!(
            "--zone-address {address:?}: {why} (expected https://HOST:PORT, e.g. https://127.0.0.1:5683)"
        )
    };
    let uri: tonic::codegen::http::Uri = address.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
    if !matches!(uri.path(), "" | "/") {
        return Err(bad("no path expected"));
    }
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    ))
}

/// The session with the zone.
pub struct Client {
    cfg: Config,
    routes: Routes,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    /// Egress mode: the per-mesh certificates this session asks for and installs.
    certs: Option<Arc<crate::egress::Certs>>,
}

impl Client {
    pub fn new(cfg: Config, routes: Routes, metrics: Arc<Metrics>) -> Client {
        Client {
            cfg,
            routes,
            metrics,
            status: Arc::new(Status::default()),
            certs: None,
        }
    }

    /// Egress mode: ask for a certificate for every mesh in the table (and renew them),
    /// installing the answers into `certs`.
    pub fn with_certs(mut self, certs: Arc<crate::egress::Certs>) -> Client {
        self.certs = Some(certs);
        self
    }

    /// Egress: send a CSR for every mesh of the table whose certificate is missing or due.
    async fn request_certs(&self, tx: &mpsc::Sender<pb::ProxyMessage>) -> Result<(), Ended> {
        let Some(certs) = &self.certs else {
            return Ok(());
        };
        let Some(zone) = self.status.progress().registered.map(|r| r.zone) else {
            return Ok(());
        };
        let table = self.routes.current();
        let meshes: std::collections::BTreeSet<&str> =
            table.services.keys().map(|k| k.mesh.as_str()).collect();
        let identity = weft_core::names::egress_identity(&zone);
        for (mesh, csr_pem) in certs.requests(meshes, &identity) {
            tracing::debug!(%mesh, "certificate requested");
            send(
                tx,
                ProxyMsg::CertificateRequest(pb::CertificateRequest { csr_pem, mesh }),
            )
            .await?;
        }
        Ok(())
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    fn set_connected(&self, connected: bool) {
        self.status.connected.store(connected, Ordering::Relaxed);
        self.metrics.set_zone_connected(connected);
    }

    /// Stay connected to the zone until `shutdown`. Returns an error only when the zone
    /// refuses the very first session (bad token, invalid ZoneIngress).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let t = &self.cfg.timing;
        let mut ever_registered = false;
        let mut attempt = 0u32;
        let mut throttle = Throttle {
            every: t.log_every,
            last: None,
            suppressed: 0,
        };
        loop {
            let mut registered = false;
            let result = self.session(&shutdown, &mut registered).await;
            self.set_connected(false);
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let ended = match result {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if let Ended::Status(s) = &ended
                && !ever_registered
                && !registered
                && matches!(
                    s.code(),
                    Code::Unauthenticated | Code::InvalidArgument | Code::PermissionDenied
                )
            {
                anyhow::bail!(
                    "the zone at {} refused this ingress: {} (check --token-file: a zone token with scope ingress for this zone, and --name/--address)",
                    self.cfg.address,
                    describe(s)
                );
            }
            if registered {
                ever_registered = true;
                attempt = 0;
            }
            let delay = weft_core::kds::backoff(
                attempt,
                t.backoff_base,
                t.backoff_max,
                rand::random::<f64>(),
            );
            attempt = attempt.saturating_add(1);
            self.metrics.reconnect();
            if let Some(left_out) = throttle.check() {
                let what = if ever_registered {
                    "zone session ended; reconnecting (routing on the last table meanwhile)"
                } else {
                    "no session with the zone yet; retrying"
                };
                tracing::warn!(
                    zone = %self.cfg.address,
                    error = %ended,
                    retry_in = ?delay,
                    failures_not_logged = left_out,
                    "{what}"
                );
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<Channel> {
        let t = &self.cfg.timing;
        let (host, _) = check_address(&self.cfg.address)?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.cfg.ca_pem))
            .domain_name(host);
        let endpoint = Endpoint::from_shared(self.cfg.address.clone())?
            .tls_config(tls)
            .context("the zone's TLS settings")?
            .connect_timeout(t.connect_timeout)
            .http2_keep_alive_interval(t.keepalive)
            .keep_alive_timeout(t.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the zone at {}", self.cfg.address))
    }

    /// One stream, until it fails or `shutdown`. `registered` is set once the zone accepted
    /// this ingress.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        registered: &mut bool,
    ) -> Result<(), Ended> {
        let token = std::fs::read_to_string(&self.cfg.token_file)
            .with_context(|| {
                format!(
                    "--token-file {}: reading the zone token",
                    self.cfg.token_file.display()
                )
            })?
            .trim()
            .to_string();
        let channel = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            c = self.connect() => c?,
        };
        let mut client = DataplaneDiscoveryClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let (tx, rx) = mpsc::channel::<pb::ProxyMessage>(16);
        let hello = pb::Hello {
            token,
            dataplane: self.cfg.resource.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            has_config: self.routes.has_table(),
            virtual_outbounds: false,
        };
        send(&tx, ProxyMsg::Hello(hello)).await?;
        let mut incoming = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)) => {
                r.map_err(Ended::Status)?.into_inner()
            }
        };
        // Egress: certificates are asked for after updates, and checked every second
        // (renewal, unanswered or refused requests).
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick(), if self.certs.is_some() && *registered => {
                    self.request_certs(&tx).await?;
                }
                msg = incoming.message() => match msg {
                    Ok(Some(pb::ZoneMessage { msg: Some(m) })) => self.handle(m, &tx, registered).await?,
                    Ok(Some(pb::ZoneMessage { msg: None })) => {
                        tracing::debug!("empty message from the zone: ignored")
                    }
                    Ok(None) => {
                        return Err(Ended::Other(anyhow::anyhow!("the zone ended the stream")))
                    }
                    Err(s) => return Err(Ended::Status(s)),
                },
            }
        }
    }

    async fn handle(
        &self,
        msg: ZoneMsg,
        tx: &mpsc::Sender<pb::ProxyMessage>,
        registered: &mut bool,
    ) -> Result<(), Ended> {
        match msg {
            ZoneMsg::Registered(r) => {
                tracing::info!(zone = %r.zone, name = %r.name, "registered with the zone");
                if r.zone.is_empty() {
                    return Err(Ended::Other(anyhow::anyhow!(
                        "the zone's Registered names no zone"
                    )));
                }
                *registered = true;
                self.set_connected(true);
                self.routes.set_zone(&r.zone);
                self.status.update(|p| {
                    p.registered = Some(Registration {
                        zone: r.zone,
                        name: r.name,
                    })
                });
            }
            ZoneMsg::Update(u) => match answer(&self.routes, &u) {
                pb::ProxyMessage {
                    msg: Some(ProxyMsg::Ack(ack)),
                } => {
                    self.status.acks.fetch_add(1, Ordering::Relaxed);
                    self.metrics.update(true);
                    let table = self.routes.current();
                    let first = !self.status.progress().has_table;
                    if first {
                        tracing::info!(
                            generation = table.generation,
                            services = table.services.len(),
                            "first routing table applied"
                        );
                    } else {
                        tracing::debug!(
                            nonce = u.nonce,
                            full = u.full,
                            generation = table.generation,
                            services = table.services.len(),
                            "routing table updated"
                        );
                    }
                    self.status.update(|p| p.has_table = true);
                    send(tx, ProxyMsg::Ack(ack)).await?;
                    self.request_certs(tx).await?;
                }
                pb::ProxyMessage { msg } => {
                    self.status.nacks.fetch_add(1, Ordering::Relaxed);
                    self.metrics.update(false);
                    if let Some(ProxyMsg::Nack(n)) = &msg {
                        tracing::warn!(nonce = n.nonce, reason = %n.reason, "update refused (NACK); keeping the current routing table");
                    }
                    if let Some(m) = msg {
                        send(tx, m).await?;
                    }
                }
            },
            ZoneMsg::Certificate(c) if self.certs.is_some() => {
                let certs = self.certs.as_ref().expect("guarded");
                match certs.install(&c.mesh, &c.chain_pem, &c.roots_pem, c.not_after_unix) {
                    Ok(cert) => tracing::info!(
                        mesh = %c.mesh, identity = %cert.id, not_after = c.not_after_unix,
                        "certificate installed"
                    ),
                    Err(e) => {
                        certs.refused(&c.mesh);
                        tracing::warn!(mesh = %c.mesh, error = %format!("{e:#}"), "the zone's certificate is unusable; asking again later");
                    }
                }
            }
            ZoneMsg::CertificateError(e) if self.certs.is_some() => {
                let certs = self.certs.as_ref().expect("guarded");
                certs.refused(&e.mesh);
                tracing::warn!(mesh = %e.mesh, reason = %e.reason, "the zone issued no certificate; asking again later (connections of that mesh are refused meanwhile)");
            }
            ZoneMsg::Certificate(_) | ZoneMsg::CertificateError(_) => {
                tracing::debug!(
                    "certificate message from the zone: an ingress holds no key; ignored"
                )
            }
        }
        Ok(())
    }
}

/// Apply `update` to `routes` and say what to answer: `Ack`, or `Nack` with the reason.
/// The sans-I/O core of the session's update handling.
pub fn answer(routes: &Routes, update: &pb::Update) -> pb::ProxyMessage {
    let msg = match routes.apply(update) {
        Ok(()) => ProxyMsg::Ack(pb::Ack {
            nonce: update.nonce,
        }),
        Err(reason) => ProxyMsg::Nack(pb::Nack {
            nonce: update.nonce,
            reason,
        }),
    };
    pb::ProxyMessage { msg: Some(msg) }
}

async fn send(tx: &mpsc::Sender<pb::ProxyMessage>, msg: ProxyMsg) -> Result<(), Ended> {
    tx.send(pb::ProxyMessage { msg: Some(msg) })
        .await
        .map_err(|_| Ended::Other(anyhow::anyhow!("the stream to the zone is closed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(mesh: &str, name: &str, port: u32) -> pb::ServiceEndpoints {
        pb::ServiceEndpoints {
            service: name.into(),
            mesh: mesh.into(),
            protocol: "tcp".into(),
            endpoints: vec![pb::Endpoint {
                address: "10.0.0.1".into(),
                port,
                ..Default::default()
            }],
            external: None,
        }
    }

    /// Full, delta, removal, and a bad update NACKed with the table unchanged.
    #[test]
    fn updates_are_acked_or_nacked() {
        let routes = Routes::new();
        let full = pb::Update {
            nonce: 1,
            full: true,
            services: vec![svc("payments", "backend", 80), svc("shop", "web", 81)],
            ..Default::default()
        };
        let ack = |nonce| pb::ProxyMessage {
            msg: Some(ProxyMsg::Ack(pb::Ack { nonce })),
        };
        assert_eq!(answer(&routes, &full), ack(1));
        let delta = pb::Update {
            nonce: 2,
            services: vec![svc("payments", "backend", 90)],
            ..Default::default()
        };
        assert_eq!(answer(&routes, &delta), ack(2));
        assert_eq!(
            routes
                .current()
                .get("payments", "backend")
                .unwrap()
                .endpoints[0]
                .port,
            90
        );
        let removal = pb::Update {
            nonce: 3,
            removed_services: vec!["web".into()],
            ..Default::default()
        };
        assert_eq!(answer(&routes, &removal), ack(3));
        assert!(routes.current().get("shop", "web").is_none());
        let before = routes.current();
        let bad = pb::Update {
            nonce: 4,
            services: vec![svc("payments", "db", 1), svc("payments", "backend", 0)],
            ..Default::default()
        };
        match answer(&routes, &bad).msg {
            Some(ProxyMsg::Nack(n)) => {
                assert_eq!(n.nonce, 4);
                assert!(
                    n.reason.contains("services[1].endpoints[0].port"),
                    "{}",
                    n.reason
                );
            }
            other => panic!("a NACK expected, got {other:?}"),
        }
        assert!(Arc::ptr_eq(&before, &routes.current()));
        assert!(routes.current().get("payments", "db").is_none());
    }

    #[test]
    fn progress_says_what_is_missing() {
        let mut p = Progress::default();
        assert_eq!(p.waiting_for(), Some("not registered with the zone yet"));
        p.registered = Some(Registration {
            zone: "east".into(),
            name: "ingress-1".into(),
        });
        assert_eq!(p.waiting_for(), Some("no routing table from the zone yet"));
        p.has_table = true;
        assert_eq!(p.waiting_for(), None);
    }

    #[test]
    fn addresses() {
        assert_eq!(
            check_address("https://127.0.0.1:5683").unwrap(),
            ("127.0.0.1".to_string(), 5683)
        );
        for bad in ["127.0.0.1:5683", "http://127.0.0.1:5683", "https://zone"] {
            let err = check_address(bad).unwrap_err().to_string();
            assert!(err.contains("--zone-address"), "{bad}: {err}");
        }
    }
}
