//! The zone session: one `DataplaneDiscovery.Stream` at a time over TLS, kept up forever.
//!
//! Per session: send `Hello`; on `Registered` ask for a workload certificate when the mesh has
//! mTLS (a fresh key each time; the key never leaves the process); apply each `Update` to the
//! [`State`] and answer `Ack` or `Nack`; install each `Certificate` in the [`Identity`] and
//! schedule the renewal at 70% of the time it has left. When the stream fails, reconnect with
//! jittered exponential backoff, keeping the configuration and certificate meanwhile. Only a
//! refusal of the very first session (bad token, invalid Dataplane) is fatal.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

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

use crate::state::State;
use crate::tls::Identity;

/// Full updates of a big mesh exceed tonic's default 4 MiB.
const MAX_MESSAGE: usize = 64 << 20;

/// Where the zone is and who this proxy is.
#[derive(Clone, Debug)]
pub struct Config {
    /// `https://HOST:PORT`.
    pub address: String,
    /// The CA of the zone's data-plane API certificate, PEM.
    pub ca_pem: String,
    /// Read again at every connection (tokens can be rotated in place).
    pub token_file: PathBuf,
    /// The Dataplane file's text, sent as is in `Hello`.
    pub dataplane: String,
    pub name: String,
    pub mesh: String,
    /// The service the CSR names (the zone decides the identity).
    pub service: String,
    /// Ask the zone for the mesh's VIP table and every service's endpoints (`--dns-address`
    /// or `--bind-vips`).
    pub virtual_outbounds: bool,
    pub timing: Timing,
}

impl Config {
    pub fn new(cfg: &crate::config::Config) -> Config {
        Config {
            address: cfg.zone_address.clone(),
            ca_pem: cfg.zone_ca_pem.clone(),
            token_file: cfg.token_file.clone(),
            dataplane: cfg.dataplane.text.clone(),
            name: cfg.dataplane.name.clone(),
            mesh: cfg.dataplane.mesh.clone(),
            service: cfg.dataplane.service(),
            virtual_outbounds: cfg.virtual_outbounds(),
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
    /// After a `CertificateError` or a certificate that does not install: ask again after
    /// this, doubling up to `cert_retry_max`.
    pub cert_retry: Duration,
    pub cert_retry_max: Duration,
    /// Ask again when a `CertificateRequest` got no answer in this long.
    pub cert_answer_timeout: Duration,
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
            cert_retry: Duration::from_secs(2),
            cert_retry_max: Duration::from_secs(30),
            cert_answer_timeout: Duration::from_secs(30),
            log_every: Duration::from_secs(10),
        }
    }
}

/// What the zone said in `Registered`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub zone: String,
    pub mesh: String,
    pub name: String,
    pub mtls: bool,
}

/// How far the proxy got; kept across sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The last `Registered`.
    pub registered: Option<Registration>,
    /// Whether the mesh has mTLS: `Registered` or the latest view says so.
    pub mtls: bool,
    /// A configuration was applied.
    pub has_config: bool,
    /// A workload certificate was installed.
    pub has_certificate: bool,
}

impl Progress {
    /// What the proxy still needs from the zone before it can serve; `None` when nothing.
    pub fn waiting_for(&self) -> Option<&'static str> {
        if !self.has_config {
            Some(match self.registered {
                None => "not registered with the zone yet",
                Some(_) => "no configuration from the zone yet",
            })
        } else if self.mtls && !self.has_certificate {
            Some("no workload certificate yet (the mesh has mTLS)")
        } else {
            None
        }
    }
}

/// The session's state for `/ready`, `/config`, `/metrics` and `main`.
#[derive(Debug, Default)]
pub struct Status {
    progress: watch::Sender<Progress>,
    connected: AtomicBool,
    reconnects: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    certs_installed: AtomicU64,
    certs_refused: AtomicU64,
    certs_invalid: AtomicU64,
}

/// Counters of the session, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub reconnects: u64,
    pub acks: u64,
    pub nacks: u64,
    /// Certificates installed.
    pub certs_installed: u64,
    /// `CertificateError`s from the zone.
    pub certs_refused: u64,
    /// Certificates that did not install (bad chain, wrong key).
    pub certs_invalid: u64,
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

    /// The zone's name, empty before the first `Registered`.
    pub fn zone(&self) -> String {
        self.progress
            .borrow()
            .registered
            .as_ref()
            .map(|r| r.zone.clone())
            .unwrap_or_default()
    }

    pub fn counters(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            reconnects: get(&self.reconnects),
            acks: get(&self.acks),
            nacks: get(&self.nacks),
            certs_installed: get(&self.certs_installed),
            certs_refused: get(&self.certs_refused),
            certs_invalid: get(&self.certs_invalid),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        self.progress.send_if_modified(|p| {
            let before = p.clone();
            f(p);
            *p != before
        });
    }
}

/// The session with the zone.
pub struct Client {
    cfg: Config,
    state: State,
    identity: Arc<Identity>,
    status: Arc<Status>,
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

/// The certificate cycle, kept across sessions.
#[derive(Default)]
struct Certs {
    /// The key of the last CSR sent: a `Certificate` is installed with it.
    key: Option<String>,
    /// When to send the next `CertificateRequest`; `None` when nothing is due.
    next: Option<Instant>,
    /// Failures in a row, for the retry delay.
    failures: u32,
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

impl Client {
    pub fn new(cfg: Config, state: State, identity: Arc<Identity>) -> Client {
        Client {
            cfg,
            state,
            identity,
            status: Arc::new(Status::default()),
        }
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Stay connected to the zone until `shutdown`. Returns an error only when the zone
    /// refuses the very first session (bad token, invalid Dataplane): that will not fix
    /// itself. After a session was once established, every failure is retried.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let t = &self.cfg.timing;
        let mut certs = Certs::default();
        let mut ever_registered = false;
        let mut attempt = 0u32;
        let mut throttle = Throttle {
            every: t.log_every,
            last: None,
            suppressed: 0,
        };
        loop {
            let mut registered = false;
            let result = self.session(&shutdown, &mut certs, &mut registered).await;
            self.status.connected.store(false, Ordering::Relaxed);
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
                    "the zone at {} refused this proxy: {}",
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
            self.status.reconnects.fetch_add(1, Ordering::Relaxed);
            if let Some(left_out) = throttle.check() {
                let what = if ever_registered {
                    "zone session ended; reconnecting (keeping the current configuration and certificate)"
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
    /// this proxy.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        certs: &mut Certs,
        registered: &mut bool,
    ) -> Result<(), Ended> {
        let token = std::fs::read_to_string(&self.cfg.token_file)
            .with_context(|| format!("reading the token {}", self.cfg.token_file.display()))?
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
            dataplane: self.cfg.dataplane.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            has_config: self.state.has_config(),
            virtual_outbounds: self.cfg.virtual_outbounds,
        };
        send(&tx, ProxyMsg::Hello(hello)).await?;
        // A CSR sent on an earlier stream will not be answered on this one.
        certs.next = None;
        let mut incoming = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)) => {
                r.map_err(Ended::Status)?.into_inner()
            }
        };
        loop {
            let due = certs.next;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = sleep_until(due) => self.request_certificate(&tx, certs).await?,
                msg = incoming.message() => match msg {
                    Ok(Some(pb::ZoneMessage { msg: Some(m) })) => {
                        self.handle(m, &tx, certs, registered).await?
                    }
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
        certs: &mut Certs,
        registered: &mut bool,
    ) -> Result<(), Ended> {
        match msg {
            ZoneMsg::Registered(r) => {
                tracing::info!(
                    zone = %r.zone, mesh = %r.mesh, dataplane = %r.name, mtls = r.mtls,
                    "registered with the zone"
                );
                *registered = true;
                self.status.connected.store(true, Ordering::Relaxed);
                self.status.update(|p| {
                    p.mtls = r.mtls;
                    p.registered = Some(Registration {
                        zone: r.zone,
                        mesh: r.mesh,
                        name: r.name,
                        mtls: r.mtls,
                    });
                });
                // Ask at once, even with a valid certificate: the mesh's roots may have
                // changed while the zone was away.
                certs.failures = 0;
                certs.next = r.mtls.then(Instant::now);
            }
            ZoneMsg::Update(u) => match self.state.apply(&u) {
                Ok(()) => {
                    self.status.acks.fetch_add(1, Ordering::Relaxed);
                    let snapshot = self.state.current();
                    tracing::debug!(
                        nonce = u.nonce,
                        full = u.full,
                        generation = snapshot.generation,
                        services = snapshot.services.len(),
                        "configuration applied"
                    );
                    // mTLS when the zone said so at registration or the view says so now.
                    let progress = self.status.progress();
                    let registered_mtls = progress.registered.as_ref().is_some_and(|r| r.mtls);
                    let mtls = registered_mtls || snapshot.view.mtls;
                    let first = !progress.has_config;
                    self.status.update(|p| {
                        p.has_config = true;
                        p.mtls = mtls;
                    });
                    if first {
                        tracing::info!(
                            generation = snapshot.generation,
                            services = snapshot.services.len(),
                            "first configuration applied"
                        );
                    }
                    // mTLS switched on under this session.
                    if mtls && certs.next.is_none() && self.identity.status().is_none() {
                        certs.next = Some(Instant::now());
                    }
                    send(tx, ProxyMsg::Ack(pb::Ack { nonce: u.nonce })).await?;
                }
                Err(reason) => {
                    self.status.nacks.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(nonce = u.nonce, %reason, "update refused (NACK); keeping the current configuration");
                    send(
                        tx,
                        ProxyMsg::Nack(pb::Nack {
                            nonce: u.nonce,
                            reason,
                        }),
                    )
                    .await?;
                }
            },
            ZoneMsg::Certificate(c) => self.install(c, certs),
            ZoneMsg::CertificateError(e) => {
                self.status.certs_refused.fetch_add(1, Ordering::Relaxed);
                let retry = self.retry_delay(certs);
                tracing::warn!(reason = %e.reason, retry_in = ?retry, "the zone could not issue a certificate; keeping the current one");
                certs.next = Some(Instant::now() + retry);
            }
        }
        Ok(())
    }

    fn install(&self, c: pb::Certificate, certs: &mut Certs) {
        let Some(key) = certs.key.as_deref() else {
            tracing::warn!("a certificate the proxy did not ask for: ignored");
            return;
        };
        match self.identity.install(key, &c.chain_pem, &c.roots_pem) {
            Ok(cert) => {
                self.status.certs_installed.fetch_add(1, Ordering::Relaxed);
                let in_ = renew_in(SystemTime::now(), cert.not_after);
                certs.failures = 0;
                certs.next = Some(Instant::now() + in_);
                self.status.update(|p| p.has_certificate = true);
                tracing::info!(
                    id = %cert.id, serial = %cert.serial,
                    not_after = ?cert.not_after, renew_in = ?in_,
                    "workload certificate installed"
                );
            }
            Err(e) => {
                self.status.certs_invalid.fetch_add(1, Ordering::Relaxed);
                let retry = self.retry_delay(certs);
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?retry, "the zone's certificate did not install; keeping the current one");
                certs.next = Some(Instant::now() + retry);
            }
        }
    }

    fn retry_delay(&self, certs: &mut Certs) -> Duration {
        let t = &self.cfg.timing;
        let d = t
            .cert_retry
            .saturating_mul(2u32.saturating_pow(certs.failures.min(16)))
            .min(t.cert_retry_max);
        certs.failures = certs.failures.saturating_add(1);
        d
    }

    /// A fresh key and a CSR for it.
    async fn request_certificate(
        &self,
        tx: &mpsc::Sender<pb::ProxyMessage>,
        certs: &mut Certs,
    ) -> Result<(), Ended> {
        let csr = weft_core::pki::new_key().and_then(|key| {
            let csr = weft_core::pki::workload_csr(&self.cfg.mesh, &self.cfg.service, &key)?;
            Ok((key, csr))
        });
        match csr {
            Ok((key, csr_pem)) => {
                certs.key = Some(key);
                // Ask again if the zone does not answer.
                certs.next = Some(Instant::now() + self.cfg.timing.cert_answer_timeout);
                tracing::debug!("certificate requested");
                send(
                    tx,
                    ProxyMsg::CertificateRequest(pb::CertificateRequest {
                        csr_pem,
                        mesh: String::new(),
                    }),
                )
                .await
            }
            Err(e) => {
                let retry = self.retry_delay(certs);
                tracing::error!(error = %e, retry_in = ?retry, "could not make a certificate request");
                certs.next = Some(Instant::now() + retry);
                Ok(())
            }
        }
    }
}

/// When to renew a certificate received at `now`: after 70% of the time it has left. Not
/// from its `not_before`, which the zone back-dates for clock skew (a short certificate
/// would look due at once). At least a second, so a certificate that is already expired
/// cannot make the proxy ask in a loop.
pub fn renew_in(now: SystemTime, not_after: SystemTime) -> Duration {
    let left = not_after.duration_since(now).unwrap_or_default();
    (left * weft_core::pki::RENEW_PERCENT / 100).max(Duration::from_secs(1))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn send(tx: &mpsc::Sender<pb::ProxyMessage>, msg: ProxyMsg) -> Result<(), Ended> {
    tx.send(pb::ProxyMessage { msg: Some(msg) })
        .await
        .map_err(|_| Ended::Other(anyhow::anyhow!("the stream to the zone is closed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_counts_from_now_not_from_not_before() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // A 30 s certificate back-dated 5 minutes: renew in 21 s, not at once.
        assert_eq!(
            renew_in(now, now + Duration::from_secs(30)),
            Duration::from_secs(21)
        );
        assert_eq!(
            renew_in(now, now - Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(
            check_address("https://127.0.0.1:5683").unwrap(),
            ("127.0.0.1".to_string(), 5683)
        );
        assert_eq!(
            check_address("https://[::1]:5683/").unwrap(),
            ("::1".to_string(), 5683)
        );
        for bad in [
            "127.0.0.1:5683",
            "http://127.0.0.1:5683",
            "https://zone",
            "https://zone:1/x",
        ] {
            let err = check_address(bad).unwrap_err().to_string();
            assert!(err.contains("expected https://HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn progress_says_what_is_missing() {
        let mut p = Progress::default();
        assert_eq!(p.waiting_for(), Some("not registered with the zone yet"));
        p.registered = Some(Registration {
            zone: "east".into(),
            mesh: "default".into(),
            name: "web".into(),
            mtls: true,
        });
        p.mtls = true;
        assert_eq!(p.waiting_for(), Some("no configuration from the zone yet"));
        p.has_config = true;
        assert!(p.waiting_for().unwrap().contains("certificate"));
        p.has_certificate = true;
        assert_eq!(p.waiting_for(), None);
    }
}
