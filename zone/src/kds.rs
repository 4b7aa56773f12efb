//! The zone's KDS client: dials global over TLS (verifying global's certificate against a
//! CA file, or against a pinned CA fingerprint), authenticates with the zone token, and runs
//! both streams: `GlobalToZone` (this zone receives) and `ZoneToGlobal` (this zone sends).
//! When either stream ends the other is torn down too, and the client reconnects after a
//! jittered exponential backoff, reconciling again by difference.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};
use weft_core::kds::{Direction, Side};
use weft_core::store::Store;
use weft_proto::driver::{self, Liveness, Stats};
use weft_proto::kds::v1 as pb;

/// Largest KDS message accepted.
pub const MAX_MESSAGE: usize = 64 << 20;
/// The metadata key carrying the zone's own name.
pub const ZONE_HEADER: &str = "weft-zone";
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How the zone decides to trust global's certificate.
#[derive(Clone, Debug)]
pub enum Trust {
    /// A PEM file with the CA that signed global's KDS certificate (`kds-ca.pem`).
    CaFile(PathBuf),
    /// `sha256:<hex>` of the CA certificate (printed by global on start).
    Fingerprint(String),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub zone: String,
    /// Global replicas, each `host:port` or `https://host:port`; tried in turn.
    pub global_addresses: Vec<String>,
    pub token_file: PathBuf,
    pub trust: Trust,
    pub liveness: Liveness,
}

/// What the zone reports about its link to global (for `/metrics` and logs).
#[derive(Default)]
pub struct Status {
    pub to_zone: Arc<Stats>,
    pub to_global: Arc<Stats>,
    reconnects: std::sync::atomic::AtomicU64,
    connected: std::sync::atomic::AtomicBool,
}

impl Status {
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub struct Client {
    cfg: Config,
    store: Arc<dyn Store>,
    instance: String,
    status: Arc<Status>,
    identity: Arc<crate::identity::Identity>,
    trust: Arc<crate::trust::Trust>,
}

impl Client {
    pub fn new(cfg: Config, store: Arc<dyn Store>, instance: String) -> Client {
        let identity = crate::identity::Identity::new(&cfg.zone);
        Client {
            cfg,
            store,
            instance,
            status: Arc::default(),
            identity,
            trust: crate::trust::Trust::new(),
        }
    }

    /// The token keys and revocations obtained from global, for checking dataplane tokens.
    pub fn trust(&self) -> Arc<crate::trust::Trust> {
        self.trust.clone()
    }

    /// The zone's intermediate CAs, obtained from global while connected.
    pub fn identity(&self) -> Arc<crate::identity::Identity> {
        self.identity.clone()
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Stay connected to global until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut attempt = 0u32;
        let mut replica = 0usize;
        loop {
            let started = Instant::now();
            let address =
                self.cfg.global_addresses[replica % self.cfg.global_addresses.len()].clone();
            let result = self.session(&address, &shutdown).await;
            self.status
                .connected
                .store(false, std::sync::atomic::Ordering::Relaxed);
            if shutdown.is_cancelled() {
                return;
            }
            match result {
                Ok(()) => tracing::info!("KDS session ended; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "KDS session failed; reconnecting")
                }
            }
            // A session that lasted a while resets the backoff.
            if started.elapsed() > Duration::from_secs(30) {
                attempt = 0;
            }
            // Try the next replica (with one address: the same one again).
            replica += 1;
            let delay =
                weft_core::kds::backoff(attempt, BACKOFF_BASE, BACKOFF_MAX, rand::random::<f64>());
            attempt = attempt.saturating_add(1);
            self.status
                .reconnects
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(?delay, attempt, "reconnecting to global");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection: both streams, until either ends.
    async fn session(&self, address: &str, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let token = std::fs::read_to_string(&self.cfg.token_file)
            .with_context(|| format!("reading the zone token {}", self.cfg.token_file.display()))?
            .trim()
            .to_string();
        anyhow::ensure!(
            !token.is_empty(),
            "the zone token file {} is empty (put the token from `weftctl generate zone-token --zone {}` in it)",
            self.cfg.token_file.display(),
            self.cfg.zone
        );
        let channel = connect(address, &self.cfg.trust).await?;
        tracing::info!(%address, "connected to global");
        let client = pb::kds_client::KdsClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let cancel = shutdown.child_token();
        let to_zone = self.stream(
            client.clone(),
            &token,
            Direction::GlobalToZone,
            cancel.clone(),
        );
        let to_global = self.stream(
            client.clone(),
            &token,
            Direction::ZoneToGlobal,
            cancel.clone(),
        );
        // While connected, obtain and renew the intermediate CAs of meshes with mTLS.
        let identity = self
            .identity
            .run(self.store.clone(), client.clone(), token.clone());
        // While connected, keep the token keys and revocations for dataplane tokens.
        let trust = self.trust.run(client, self.cfg.zone.clone(), token.clone());
        tokio::pin!(to_zone, to_global, identity, trust);
        // Whichever stream ends first ends the session; the other is cancelled.
        let first = tokio::select! {
            r = &mut to_zone => ("global-to-zone", r),
            r = &mut to_global => ("zone-to-global", r),
            () = &mut identity => unreachable!("the identity loop runs until dropped"),
            () = &mut trust => unreachable!("the trust loop runs until dropped"),
        };
        cancel.cancel();
        let (name, r) = first;
        r.with_context(|| format!("{name} stream"))
    }

    async fn stream(
        &self,
        mut client: pb::kds_client::KdsClient<Channel>,
        token: &str,
        dir: Direction,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel::<pb::Message>(match dir {
            Direction::ZoneToGlobal => 64,
            Direction::GlobalToZone => 1 << 16,
        });
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .context("the zone token is not valid header text")?,
        );
        // Global refuses a token issued for another zone than the one we say we are.
        req.metadata_mut().insert(
            ZONE_HEADER,
            self.cfg
                .zone
                .parse()
                .context("the zone name is not valid header text")?,
        );
        let incoming = match dir {
            Direction::GlobalToZone => client.global_to_zone(req).await,
            Direction::ZoneToGlobal => client.zone_to_global(req).await,
        }
        .map_err(|s| anyhow::anyhow!("global refused the stream: {}", s.message()))?
        .into_inner();
        self.status
            .connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let stream = weft_core::kds::Stream::new(dir, &self.cfg.zone, Side::Zone);
        let store = self.store.clone();
        let live = self.cfg.liveness;
        let r = match dir {
            Direction::GlobalToZone => {
                driver::run_receiver(
                    store,
                    stream,
                    &self.instance,
                    incoming,
                    tx,
                    live,
                    self.status.to_zone.clone(),
                    cancel,
                )
                .await
            }
            Direction::ZoneToGlobal => {
                driver::run_sender(
                    store,
                    stream,
                    &self.instance,
                    incoming,
                    tx,
                    live,
                    self.status.to_global.clone(),
                    cancel,
                )
                .await
            }
        };
        match r {
            Err(driver::Error::Status(s)) => {
                Err(anyhow::anyhow!("global ended the stream: {}", s.message()))
            }
            other => other.map_err(anyhow::Error::from),
        }
    }
}

/// Split `https://host:port` / `host:port` into (host, port).
fn host_port(address: &str) -> anyhow::Result<(String, u16)> {
    let a = address
        .trim_start_matches("https://")
        .trim_start_matches("grpcs://")
        .trim_end_matches('/');
    let (host, port) = a.rsplit_once(':').with_context(|| {
        format!("global address {address:?}: expected host:port, e.g. 127.0.0.1:5685")
    })?;
    let port = port
        .parse()
        .with_context(|| format!("global address {address:?}: bad port"))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    ))
}

/// A TLS client config trusting global as configured, speaking h2.
pub fn tls_config(trust: &Trust) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let mut config = match trust {
        Trust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading global's CA {}", path.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("parsing global's CA {}", path.display()))?;
            anyhow::ensure!(
                !certs.is_empty(),
                "{}: no certificate in the file",
                path.display()
            );
            for c in certs {
                roots
                    .add(c)
                    .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Fingerprint(fp) => {
            let want = parse_fingerprint(fp)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned { want, provider }))
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn parse_fingerprint(fp: &str) -> anyhow::Result<[u8; 32]> {
    let hexed = fp.strip_prefix("sha256:").unwrap_or(fp).replace(':', "");
    let bytes = hex::decode(&hexed)
        .with_context(|| format!("fingerprint {fp:?}: expected sha256:<64 hex digits>"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("fingerprint {fp:?}: expected sha256:<64 hex digits>"))
}

/// Trusts a server whose chain includes the CA with the pinned fingerprint, and whose
/// certificate that CA signed for the name dialled (full WebPKI checks against that CA).
#[derive(Debug)]
struct Pinned {
    want: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref())[..] == self.want[..])
            .ok_or_else(|| {
                rustls::Error::General("global's certificate chain does not contain the pinned CA (check --global-fingerprint)".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Open a gRPC channel to global over our own TLS connector.
pub async fn connect(address: &str, trust: &Trust) -> anyhow::Result<Channel> {
    let (host, port) = host_port(address)?;
    let tls = Arc::new(tls_config(trust)?);
    let server_name = ServerName::try_from(host.clone())
        .with_context(|| format!("{host:?} is not a valid server name"))?;
    let addr = format!("{host}:{port}");
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, server_name, addr) = (tls.clone(), server_name.clone(), addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    // The scheme is http: TLS is done by the connector above.
    let endpoint = Endpoint::from_shared(format!("http://{host}:{port}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    endpoint
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to global at {address}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_fingerprints() {
        assert_eq!(
            host_port("https://127.0.0.1:5685").unwrap(),
            ("127.0.0.1".into(), 5685)
        );
        assert_eq!(
            host_port("global.example:443").unwrap(),
            ("global.example".into(), 443)
        );
        assert_eq!(host_port("[::1]:5685").unwrap(), ("::1".into(), 5685));
        assert!(host_port("nohost").is_err());
        assert!(parse_fingerprint(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        assert!(parse_fingerprint("sha256:abcd").is_err());
    }
}

/// The KDS link's metrics in Prometheus text form.
pub fn render_metrics(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP weft_kds_connected Whether the zone is connected to global (1) or not (0)."
    );
    let _ = writeln!(out, "# TYPE weft_kds_connected gauge");
    let _ = writeln!(out, "weft_kds_connected {}", u8::from(status.connected()));
    let _ = writeln!(
        out,
        "# HELP weft_kds_reconnects Times the zone reconnected to global."
    );
    let _ = writeln!(out, "# TYPE weft_kds_reconnects counter");
    let _ = writeln!(out, "weft_kds_reconnects_total {}", status.reconnects());
    let streams = [
        ("global_to_zone", status.to_zone.snapshot()),
        ("zone_to_global", status.to_global.snapshot()),
    ];
    let _ = writeln!(
        out,
        "# HELP weft_kds_synced Whether the stream finished reconciling since it (re)connected."
    );
    let _ = writeln!(out, "# TYPE weft_kds_synced gauge");
    for (dir, s) in &streams {
        let _ = writeln!(
            out,
            "weft_kds_synced{{direction=\"{dir}\"}} {}",
            u8::from(s.synced)
        );
    }
    let _ = writeln!(
        out,
        "# HELP weft_kds_last_seen_seconds Seconds since the stream last heard from global."
    );
    let _ = writeln!(out, "# TYPE weft_kds_last_seen_seconds gauge");
    for (dir, s) in &streams {
        if let Some(t) = s.last_seen {
            let _ = writeln!(
                out,
                "weft_kds_last_seen_seconds{{direction=\"{dir}\"}} {:.3}",
                t.elapsed().as_secs_f64()
            );
        }
    }
    for (name, help) in [
        (
            "sent",
            "Resources sent (zone to global) or received (global to zone).",
        ),
        (
            "acked",
            "Resources acknowledged (sent) or applied (received).",
        ),
        ("nacked", "Resources refused."),
    ] {
        let _ = writeln!(out, "# HELP weft_kds_resources_{name} {help}");
        let _ = writeln!(out, "# TYPE weft_kds_resources_{name} counter");
        for (dir, s) in &streams {
            for (kind, k) in &s.kinds {
                let v = match name {
                    "sent" => k.sent,
                    "acked" => k.acked,
                    _ => k.nacked,
                };
                let _ = writeln!(
                    out,
                    "weft_kds_resources_{name}_total{{direction=\"{dir}\",kind=\"{kind}\"}} {v}"
                );
            }
        }
    }
    out
}
