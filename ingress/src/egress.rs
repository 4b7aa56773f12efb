//! The zone egress (`--mode egress`): this zone's proxies reach `MeshExternalService`s through
//! it. Unlike the ingress, the egress **terminates** the proxy's mTLS: it holds a workload
//! certificate per mesh (`spiffe://<mesh>/zone-egress.<zone>`, [`Certs`], asked for by the
//! session with a CSR per mesh; the key never leaves the process), requires the caller's
//! certificate chained to that mesh's root, and reads the caller's service from its SPIFFE
//! ID. Then:
//!
//! 1. the SNI `<service>.<zone>.<mesh>.weft` names the external service (this zone only);
//! 2. the service's MeshTrafficPermission rules decide for the caller: a denied HTTP caller
//!    gets a `403` (its request head is read first), any other denied caller a closed
//!    connection; counted in `refused_total{reason="denied"}`;
//! 3. the egress connects to an external endpoint (round robin, the next on failure), with
//!    TLS when the MeshExternalService says `tls.enabled` (verified against `--external-ca-file`,
//!    the system roots by default), and splices both directions.
//!
//! Permissions are re-checked on every routing-table change: a connection whose caller is
//! no longer allowed is cut (HTTP clients pool their connections; a permission change must
//! reach them without waiting for the pool to recycle).
//!
//! **Cross-zone passthrough** (`Mesh.spec.routing.zoneEgress`): the zone gives such a mesh's
//! proxies this egress as the endpoint of other zones' services, and gives the egress the
//! routes (a set without `external`, endpoints = the other zones' ingresses with their
//! zone). An SNI naming another zone that the table has a route to is **not terminated**:
//! the buffered ClientHello and then the bytes go to that zone's ingress, as the ingress does
//! it ([`proxy::pass`]); the mTLS stays end to end between the caller and the remote backend,
//! which authenticates the caller and applies its permissions. Counted in
//! `passthrough_connections_total{mesh, service, zone}`.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;
use tracing::Instrument as _;
use weft_core::names::Sni;
use weft_core::pki::{self, SpiffeId};
use weft_core::spec::policies::Action;

use crate::hello;
use crate::metrics::Reason;
use crate::proxy::{self, Counted};
use crate::table::{Service, Table, Verification};

/// An unanswered CertificateRequest is sent again after this.
pub const CERT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// After a CertificateError, ask again after this.
pub const CERT_RETRY: Duration = Duration::from_secs(5);
/// A denied HTTP caller's request head is read for at most this long (and this many bytes)
/// before the 403.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST_HEAD: usize = 64 * 1024;

fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// One mesh's certificate, as installed.
pub struct MeshCert {
    pub id: SpiffeId,
    pub not_after: SystemTime,
    renew_at: SystemTime,
    roots: Vec<CertificateDer<'static>>,
    server: Arc<ServerConfig>,
}

impl fmt::Debug for MeshCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshCert")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// A CSR sent and not answered yet.
struct Asked {
    key_pem: String,
    at: Instant,
}

/// The egress's certificates, per mesh. The session asks for what is missing or due
/// ([`Certs::requests`]) and installs answers ([`Certs::install`]); the data path reads
/// [`Certs::server_config`] per connection.
#[derive(Default)]
pub struct Certs {
    current: RwLock<HashMap<String, Arc<MeshCert>>>,
    asked: Mutex<HashMap<String, Asked>>,
    /// Meshes whose last request was refused, and when to ask again.
    retry: Mutex<HashMap<String, Instant>>,
}

impl fmt::Debug for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Certs")
    }
}

impl Certs {
    pub fn get(&self, mesh: &str) -> Option<Arc<MeshCert>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(mesh)
            .cloned()
    }

    /// `(mesh, not after)` of every installed certificate, for `/config`.
    pub fn summary(&self) -> Vec<(String, String, u64)> {
        let mut out: Vec<_> = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(m, c)| {
                (
                    m.clone(),
                    c.id.to_string(),
                    c.not_after
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// The server configuration for connections of `mesh`, when the egress has its
    /// certificate.
    pub fn server_config(&self, mesh: &str) -> Option<Arc<ServerConfig>> {
        self.get(mesh).map(|c| c.server.clone())
    }

    /// The CSRs to send now, `(mesh, csr_pem)`: for each of `meshes` without a certificate,
    /// or past its renewal time, unless a request is outstanding (younger than
    /// [`CERT_ANSWER_TIMEOUT`]) or refused recently. A fresh key per request.
    pub fn requests<'a>(
        &self,
        meshes: impl IntoIterator<Item = &'a str>,
        identity: &str,
    ) -> Vec<(String, String)> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut out = Vec::new();
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        let retry = self.retry.lock().unwrap_or_else(|e| e.into_inner());
        for mesh in meshes {
            if self.get(mesh).is_some_and(|c| wall < c.renew_at) {
                continue;
            }
            if asked
                .get(mesh)
                .is_some_and(|a| now < a.at + CERT_ANSWER_TIMEOUT)
            {
                continue;
            }
            if retry.get(mesh).is_some_and(|t| now < *t) {
                continue;
            }
            let made = pki::new_key()
                .and_then(|key| pki::workload_csr(mesh, identity, &key).map(|csr| (key, csr)));
            match made {
                Ok((key_pem, csr)) => {
                    asked.insert(mesh.to_string(), Asked { key_pem, at: now });
                    out.push((mesh.to_string(), csr));
                }
                Err(e) => {
                    tracing::error!(mesh, error = %e, "making a key and CSR for the mesh's certificate")
                }
            }
        }
        out
    }

    /// The zone refused the request for `mesh`: ask again after [`CERT_RETRY`].
    pub fn refused(&self, mesh: &str) {
        self.asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mesh);
        self.retry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(mesh.to_string(), Instant::now() + CERT_RETRY);
    }

    /// Install the zone's answer for `mesh`: the chain must verify against the roots, name
    /// this mesh, and match the key made for the request. Connections already open keep
    /// their certificate. Renewal is due at 70% of the time left now.
    pub fn install(
        &self,
        mesh: &str,
        chain_pem: &str,
        roots_pem: &[String],
        not_after_unix: i64,
    ) -> anyhow::Result<Arc<MeshCert>> {
        let key_pem = self
            .asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(mesh)
            .map(|a| a.key_pem.clone())
            .ok_or_else(|| {
                anyhow::anyhow!("a certificate for mesh {mesh:?} that was not asked for")
            })?;
        let chain = pki::certs_from_pem(chain_pem).context("certificate chain")?;
        let mut roots = Vec::new();
        for (i, pem) in roots_pem.iter().enumerate() {
            roots.extend(pki::certs_from_pem(pem).with_context(|| format!("trust root {i}"))?);
        }
        anyhow::ensure!(!roots.is_empty(), "no trust roots given");
        let now = SystemTime::now();
        let id = roots
            .iter()
            .find_map(|r| pki::verify_workload(&chain, r, now).ok())
            .ok_or_else(|| anyhow::anyhow!("the chain does not verify against the mesh roots"))?;
        anyhow::ensure!(
            id.mesh == mesh,
            "the certificate names {id}, not mesh {mesh}"
        );
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("private key: {e}"))?;
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| anyhow::anyhow!("private key: {e}"))?;
        let certified = Arc::new(CertifiedKey::new(chain.clone(), signing));
        certified
            .keys_match()
            .map_err(|e| anyhow::anyhow!("the key does not match the certificate ({e})"))?;
        let not_before = now;
        let not_after =
            UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after_unix).unwrap_or(0));
        let mut server = ServerConfig::builder_with_provider(provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(MeshClients {
                mesh: mesh.to_string(),
                roots: roots.clone(),
            }))
            .with_cert_resolver(Arc::new(Fixed(certified)));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let cert = Arc::new(MeshCert {
            id,
            not_after,
            renew_at: pki::renew_at(not_before, not_after),
            roots,
            server: Arc::new(server),
        });
        self.current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(mesh.to_string(), cert.clone());
        self.asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mesh);
        self.retry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mesh);
        Ok(cert)
    }
}

/// Serves one certified key.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Requires a client certificate chained to one of the mesh's roots, naming a workload of
/// the mesh.
struct MeshClients {
    mesh: String,
    roots: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for MeshClients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MeshClients({})", self.mesh)
    }
}

impl MeshClients {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<SpiffeId, String> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        let mut last = String::from("no trust roots");
        for root in &self.roots {
            match pki::verify_workload(&chain, root, now) {
                Ok(id) if id.mesh == self.mesh => return Ok(id),
                Ok(id) => return Err(format!("{id} is outside mesh {}", self.mesh)),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

fn verify_error(msg: String) -> rustls::Error {
    #[derive(Debug)]
    struct E(String);
    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for E {}
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(E(msg)),
    )))
}

impl ClientCertVerifier for MeshClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
        self.verify(end_entity, intermediates, now)
            .map_err(verify_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
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
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The roots external servers are verified against: every certificate of `pem` (the
/// `--external-ca-file`, by default the system bundle).
pub fn external_roots(pem: &str) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| anyhow::anyhow!("not readable PEM: {e}"))?;
        // A bundle may hold certificates webpki cannot use as anchors: skip those.
        let _ = store.add(cert);
    }
    anyhow::ensure!(
        !store.is_empty(),
        "no usable CA certificate in the file (expected PEM certificates)"
    );
    Ok(store)
}

/// Client configurations for external TLS, per verification mode (made once).
pub struct Upstream {
    secured: Arc<rustls::ClientConfig>,
    skip_san: Arc<rustls::ClientConfig>,
    skip_all: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Upstream")
    }
}

impl Upstream {
    pub fn new(roots: RootCertStore) -> anyhow::Result<Upstream> {
        let roots = Arc::new(roots);
        let builder = || {
            rustls::ClientConfig::builder_with_provider(provider().clone())
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default versions")
        };
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider().clone(),
        )
        .build()
        .context("the external CA roots")?;
        let secured = builder()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let skip_san = builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                inner: Some(webpki),
            }))
            .with_no_client_auth();
        let skip_all = builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient { inner: None }))
            .with_no_client_auth();
        Ok(Upstream {
            secured: Arc::new(secured),
            skip_san: Arc::new(skip_san),
            skip_all: Arc::new(skip_all),
        })
    }

    fn config(&self, v: Verification) -> Arc<rustls::ClientConfig> {
        match v {
            Verification::Secured => self.secured.clone(),
            Verification::SkipSan => self.skip_san.clone(),
            Verification::SkipAll => self.skip_all.clone(),
        }
    }
}

/// SkipSAN (`inner` set: the chain is verified, the name is not) and SkipAll (`None`).
struct Lenient {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl fmt::Debug for Lenient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Lenient")
    }
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
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
            &provider().signature_verification_algorithms,
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
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What the egress's listener needs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Context {
    pub base: proxy::Context,
    pub certs: Arc<Certs>,
    pub upstream: Arc<Upstream>,
}

/// Where a connection goes.
#[derive(Debug)]
pub enum Route {
    /// A MeshExternalService of this zone: terminate the caller's mTLS, check permissions.
    External(Sni, Arc<Service>),
    /// Another zone's service of a mesh that requires the egress: pass the TLS through to
    /// that zone's ingresses (the endpoints of the service in `sni.zone`).
    Passthrough(Sni, Arc<Service>),
}

/// Where an SNI goes in `table`: an external service, another zone's ingress, or why not.
pub fn route(table: &Table, server_name: Option<&str>) -> Result<Route, proxy::Refusal> {
    let refusal = |reason, detail: String| proxy::Refusal { reason, detail };
    let name =
        server_name.ok_or_else(|| refusal(Reason::NoSni, "no SNI in the ClientHello".into()))?;
    let sni: Sni = name
        .parse()
        .map_err(|e: String| refusal(Reason::BadSni, e))?;
    if sni.zone != table.zone {
        let service = table
            .get(&sni.mesh, &sni.service)
            .filter(|s| s.external.is_none())
            .ok_or_else(|| {
                refusal(
                    Reason::OtherZone,
                    format!(
                        "SNI {name:?} is for zone {:?}; this egress serves the proxies of zone {:?} and has no route to service {:?} of mesh {:?} in other zones (only meshes with routing.zoneEgress: true get routes)",
                        sni.zone, table.zone, sni.service, sni.mesh
                    ),
                )
            })?;
        if !service.endpoints.iter().any(|e| e.zone == sni.zone) {
            return Err(refusal(
                Reason::NoEndpoint,
                format!(
                    "service {:?} of mesh {:?}: no ingress of zone {:?} to pass the connection to",
                    sni.service, sni.mesh, sni.zone
                ),
            ));
        }
        return Ok(Route::Passthrough(sni, service.clone()));
    }
    let service = table
        .get(&sni.mesh, &sni.service)
        .filter(|s| s.external.is_some())
        .ok_or_else(|| {
            refusal(
                Reason::UnknownService,
                format!(
                    "no MeshExternalService {:?} in mesh {:?}",
                    sni.service, sni.mesh
                ),
            )
        })?;
    if service.endpoints.is_empty() {
        return Err(refusal(
            Reason::NoEndpoint,
            format!(
                "MeshExternalService {:?} of mesh {:?} has no endpoints",
                sni.service, sni.mesh
            ),
        ));
    }
    Ok(Route::External(sni, service.clone()))
}

/// Whether `caller` may use `service` now.
pub fn allowed(service: &Service, caller: &str) -> bool {
    let Some(x) = &service.external else {
        return false;
    };
    x.permissions
        .allows(caller, &Default::default(), x.default_deny)
        != Action::Deny
}

/// Accept on `listener` until draining; each connection is a task on the tracker.
pub async fn serve(listener: TcpListener, ctx: Context) -> io::Result<()> {
    loop {
        let (stream, peer) = tokio::select! {
            _ = ctx.base.draining.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let span = tracing::debug_span!("conn", %peer);
        ctx.base
            .tasks
            .spawn(handle(stream, peer, ctx.clone()).instrument(span));
    }
}

fn refuse(ctx: &Context, r: proxy::Refusal) {
    ctx.base.metrics.refused(r.reason);
    match r.reason {
        Reason::OtherZone
        | Reason::UnknownService
        | Reason::NoEndpoint
        | Reason::NoCertificate
        | Reason::Denied
        | Reason::Handshake => {
            tracing::warn!(reason = r.reason.as_str(), detail = %r.detail, "connection refused")
        }
        _ => tracing::debug!(reason = r.reason.as_str(), detail = %r.detail, "connection refused"),
    }
}

async fn handle(mut client: TcpStream, peer: SocketAddr, ctx: Context) {
    let _ = client.set_nodelay(true);
    let refusal = |reason, detail: String| proxy::Refusal { reason, detail };
    // The ClientHello is read and buffered first, without terminating anything: a
    // passthrough replays it as it came; a terminated connection feeds it to rustls.
    let read = tokio::time::timeout(ctx.base.timing.hello_timeout, hello::read(&mut client)).await;
    let (hello, buffered) = match read {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let reason = match &e {
                hello::Error::Plaintext => Reason::Plaintext,
                hello::Error::Malformed(_) | hello::Error::TooLarge => Reason::BadTls,
                hello::Error::Closed | hello::Error::Io(_) => Reason::EarlyClose,
            };
            return refuse(&ctx, refusal(reason, e.to_string()));
        }
        Err(_) => {
            return refuse(
                &ctx,
                refusal(Reason::Timeout, "no complete ClientHello in time".into()),
            );
        }
    };
    let table = ctx.base.routes.current();
    let route = route(&table, hello.server_name.as_deref());
    drop(table);
    let (sni, service) = match route {
        Ok(Route::External(sni, service)) => (sni, service),
        Ok(Route::Passthrough(sni, service)) => {
            return passthrough(&ctx, client, buffered, sni, service, peer).await;
        }
        Err(r) => return refuse(&ctx, r),
    };
    let start = LazyConfigAcceptor::new(
        Acceptor::default(),
        Replay {
            head: buffered,
            at: 0,
            io: client,
        },
    )
    .await;
    let start = match start {
        Ok(s) => s,
        Err(e) => return refuse(&ctx, refusal(Reason::BadTls, e.to_string())),
    };
    let Some(config) = ctx.certs.server_config(&sni.mesh) else {
        return refuse(
            &ctx,
            refusal(
                Reason::NoCertificate,
                format!(
                    "no certificate for mesh {:?} yet (the zone issues one when the mesh has mTLS)",
                    sni.mesh
                ),
            ),
        );
    };
    let tls = match tokio::time::timeout(ctx.base.timing.hello_timeout, start.into_stream(config))
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            return refuse(
                &ctx,
                refusal(Reason::Handshake, format!("{sni}: TLS handshake: {e}")),
            );
        }
        Err(_) => {
            return refuse(
                &ctx,
                refusal(Reason::Handshake, format!("{sni}: TLS handshake timed out")),
            );
        }
    };
    // The verifier checked the chain; read the caller's identity from it.
    let caller = tls.get_ref().1.peer_certificates().and_then(|chain| {
        let cert = ctx.certs.get(&sni.mesh)?;
        cert.roots
            .iter()
            .find_map(|r| pki::verify_workload(chain, r, SystemTime::now()).ok())
    });
    let Some(caller) = caller else {
        return refuse(
            &ctx,
            refusal(
                Reason::Handshake,
                format!("{sni}: no verified client identity"),
            ),
        );
    };
    if !allowed(&service, &caller.service) {
        refuse(
            &ctx,
            refusal(
                Reason::Denied,
                format!(
                    "{caller} may not use MeshExternalService {:?} of mesh {:?} (MeshTrafficPermission)",
                    sni.service, sni.mesh
                ),
            ),
        );
        if service.protocol == "http" {
            forbidden(tls, &caller, &sni).await;
        }
        return;
    }
    let Some(upstream) = connect(&ctx, &service).await else {
        tracing::warn!(%sni, endpoints = service.endpoints.len(), "no external endpoint accepted the connection; closing");
        return;
    };
    let conn = ctx.base.metrics.conn(&sni.mesh, &sni.service);
    let _active = ctx.base.metrics.opened(&sni.mesh, &sni.service, &conn);
    tracing::debug!(%sni, %caller, "egress connection");
    let mut client = Counted {
        io: tls,
        rx: conn.rx.clone(),
        tx: conn.tx.clone(),
    };
    let mut changes = ctx.base.routes.subscribe();
    let splice = async {
        match upstream {
            Io::Plain(mut s) => tokio::io::copy_bidirectional(&mut client, &mut s).await,
            Io::Tls(mut s) => tokio::io::copy_bidirectional(&mut client, &mut *s).await,
        }
    };
    tokio::pin!(splice);
    loop {
        tokio::select! {
            r = &mut splice => {
                match r {
                    Ok((up, down)) => tracing::debug!(%sni, %peer, up, down, "connection done"),
                    Err(e) => tracing::debug!(%sni, %peer, error = %e, "connection ended with an error"),
                }
                return;
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    continue;
                }
                let table = changes.borrow_and_update().clone();
                let still = table
                    .get(&sni.mesh, &sni.service)
                    .is_some_and(|s| allowed(s, &caller.service));
                if !still {
                    ctx.base.metrics.refused(Reason::Denied);
                    tracing::info!(%sni, %caller, "the caller is no longer allowed (or the external service is gone): connection cut");
                    return;
                }
            }
        }
    }
}

/// Pass the connection, still encrypted, to an ingress of `sni.zone` (the caller's mesh
/// requires the egress for cross-zone traffic).
async fn passthrough(
    ctx: &Context,
    client: TcpStream,
    buffered: Vec<u8>,
    sni: Sni,
    service: Arc<Service>,
    peer: SocketAddr,
) {
    let Some(upstream) = proxy::connect(&ctx.base, &service, service.pick_in_zone(&sni.zone)).await
    else {
        tracing::warn!(%sni, zone = %sni.zone, "no ingress of the zone accepted the connection; closing");
        return;
    };
    let conn = ctx.base.metrics.conn(&sni.mesh, &sni.service);
    let _active = ctx
        .base
        .metrics
        .passed(&sni.mesh, &sni.service, &sni.zone, &conn);
    tracing::debug!(%sni, "passing through to the zone's ingress");
    proxy::pass(client, upstream, buffered, &conn, &sni, peer).await;
}

/// The client socket with the bytes already read from it (the ClientHello) put back in
/// front, for rustls to read again.
struct Replay<S> {
    head: Vec<u8>,
    at: usize,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            if self.at == self.head.len() {
                self.head = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Answer a denied HTTP/1 caller with a 403 after reading its request head.
async fn forbidden<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, caller: &SpiffeId, sni: &Sni) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(REQUEST_HEAD_TIMEOUT, read).await;
    let body = format!(
        "{caller} may not use {} of mesh {} (MeshTrafficPermission)\n",
        sni.service, sni.mesh
    );
    let response = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connect to the external service's endpoints in round-robin order until one accepts
/// (and, with TLS, completes the handshake).
async fn connect(ctx: &Context, service: &Service) -> Option<Io> {
    let x = service.external.as_ref()?;
    for ep in service.pick() {
        let timeout = ctx.base.timing.connect_timeout;
        let attempt = async {
            let tcp = TcpStream::connect((ep.address.as_str(), ep.port))
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            if !x.tls {
                return Ok(Io::Plain(tcp));
            }
            let name = if x.server_name.is_empty() {
                ep.address.as_str()
            } else {
                x.server_name.as_str()
            };
            let name = ServerName::try_from(name.to_string())
                .map_err(|e| format!("server name {name:?}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(ctx.upstream.config(x.verification))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Ok::<_, String>(Io::Tls(Box::new(tls)))
        };
        let error = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(io)) => return Some(io),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {timeout:?}"),
        };
        ctx.base.metrics.upstream_failure();
        tracing::warn!(
            mesh = %service.mesh, service = %service.service,
            endpoint = %ep.authority(), %error,
            "connecting to an external endpoint failed; trying the next one"
        );
    }
    None
}
