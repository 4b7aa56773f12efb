//! The proxy's workload identity and the rustls configurations built on it.
//!
//! CONTRACT (implemented by the traffic side; the session side calls `new`, `install`,
//! `status`):
//! - [`Identity::install`] swaps in a new key + chain + trust roots atomically; handshakes
//!   from then on use them, connections already open keep theirs (rotation never drops a
//!   connection);
//! - [`Identity::server_config`] is TLS 1.3 only, requires a client certificate that chains to
//!   a mesh root and carries a SPIFFE ID of this mesh (`spiffe://<mesh>/<service>`);
//! - [`Identity::client_config`] presents the current certificate and accepts only a server
//!   whose certificate chains to a mesh root and carries exactly `expected`;
//! - [`peer_identity`] reads the verified SPIFFE ID of the other end of a connection.
//!
//! How: the installed material (certified key, roots, status) sits behind one
//! `RwLock<Option<Arc<Material>>>`. The rustls configurations never copy it: their
//! certificate resolvers and verifiers read the current material at handshake time, so an
//! `install` applies to the next handshake and never touches a connection already open
//! (rustls keeps what it negotiated). Built configurations are cached (server per ALPN list,
//! client per expected identity and ALPN list) so a connection costs a handshake, not a
//! config build. TLS 1.3 session resumption is on (it saves the signatures and the chain
//! verification of a full handshake), but the session caches are tied to the installed
//! material: the first use after an `install` finds them empty, so no session from before the
//! change skips verification against the new roots or shows the old certificate.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientConfig, ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Resumption,
};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache, StoresServerSessions,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use weft_core::pki::{self, SpiffeId};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// The current certificate, as shown by `/config`, `/metrics` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertStatus {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial number of the workload certificate.
    pub serial: String,
}

/// What one `install` put in place.
struct Material {
    key: Arc<CertifiedKey>,
    roots: Vec<CertificateDer<'static>>,
    status: CertStatus,
}

/// The part the rustls resolvers and verifiers share with [`Identity`].
struct Shared {
    mesh: String,
    current: RwLock<Option<Arc<Material>>>,
    /// Bumped by every `install`: session caches start over when it changes.
    generation: AtomicU64,
}

impl Shared {
    fn current(&self) -> Option<Arc<Material>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Verify a peer's chain against the current roots; the identity must be of this mesh.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        let Some(m) = self.current() else {
            return Err(other(VerifyError(
                "no trust roots installed yet".to_string(),
            )));
        };
        let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let mut last = None;
        for root in &m.roots {
            match pki::verify_workload(&chain, root, now) {
                Ok(id) if id.mesh == self.mesh => return Ok(id),
                Ok(id) => {
                    return Err(other(VerifyError(format!(
                        "{id} is outside mesh {}",
                        self.mesh
                    ))));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => other(VerifyError(e.to_string())),
            None => other(VerifyError("no trust roots".to_string())),
        })
    }
}

#[derive(Debug)]
struct VerifyError(String);

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VerifyError {}

fn other(e: VerifyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// rustls' ring provider, made once; no process-wide default is installed or needed.
fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Configurations by ALPN list.
type ByAlpn<C> = Vec<(Vec<Vec<u8>>, Arc<C>)>;

pub struct Identity {
    shared: Arc<Shared>,
    servers: Mutex<ByAlpn<ServerConfig>>,
    clients: Mutex<HashMap<SpiffeId, ByAlpn<ClientConfig>>>,
}

impl Identity {
    pub fn new(mesh: &str) -> Arc<Identity> {
        Arc::new(Identity {
            shared: Arc::new(Shared {
                mesh: mesh.to_string(),
                current: RwLock::new(None),
                generation: AtomicU64::new(0),
            }),
            servers: Mutex::new(Vec::new()),
            clients: Mutex::new(HashMap::new()),
        })
    }

    pub fn mesh(&self) -> &str {
        &self.shared.mesh
    }

    /// Install a key (PKCS#8 PEM, the proxy's own), the chain the zone issued for it (workload
    /// certificate then intermediate, PEM) and the mesh roots (PEM each). Checks that the
    /// chain verifies against the roots and matches the key before anything changes.
    pub fn install(
        &self,
        key_pem: &str,
        chain_pem: &str,
        roots_pem: &[String],
    ) -> anyhow::Result<CertStatus> {
        let mesh = &self.shared.mesh;
        let chain = pki::certs_from_pem(chain_pem).context("workload certificate chain")?;
        let mut roots = Vec::with_capacity(roots_pem.len());
        for (i, pem) in roots_pem.iter().enumerate() {
            roots.extend(pki::certs_from_pem(pem).with_context(|| format!("trust root {i}"))?);
        }
        anyhow::ensure!(!roots.is_empty(), "no trust roots given");
        let now = SystemTime::now();
        let mut errors = Vec::new();
        let id = roots
            .iter()
            .find_map(|root| {
                pki::verify_workload(&chain, root, now)
                    .map_err(|e| errors.push(e.to_string()))
                    .ok()
            })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "workload certificate does not verify against the mesh roots: {}",
                    errors.join("; ")
                )
            })?;
        anyhow::ensure!(
            id.mesh == *mesh,
            "workload certificate names {id}, outside mesh {mesh}"
        );
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("private key: not a PEM private key ({e})"))?;
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| anyhow::anyhow!("private key: {e}"))?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|e| {
            anyhow::anyhow!("private key does not match the workload certificate ({e})")
        })?;
        let (not_before, not_after, serial) = cert_facts(&certified.cert[0])
            .ok_or_else(|| anyhow::anyhow!("workload certificate: unreadable"))?;
        let status = CertStatus {
            id,
            not_before,
            not_after,
            serial,
        };
        let material = Arc::new(Material {
            key: Arc::new(certified),
            roots,
            status: status.clone(),
        });
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(material);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        Ok(status)
    }

    /// The installed certificate, `None` before the first `install`.
    pub fn status(&self) -> Option<CertStatus> {
        self.shared.current().map(|m| m.status.clone())
    }

    /// Server side of an mTLS inbound; `alpn` e.g. `[b"h2", b"http/1.1"]` (empty for TCP).
    ///
    /// Cached: call it per connection. Before the first `install` every handshake fails.
    pub fn server_config(self: &Arc<Self>, alpn: Vec<Vec<u8>>) -> Arc<rustls::ServerConfig> {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = servers.iter().find(|(a, _)| *a == alpn) {
            return c.clone();
        }
        let mut config = ServerConfig::builder_with_provider(provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(ClientVerifier(self.shared.clone())))
            .with_cert_resolver(Arc::new(CurrentKey(self.shared.clone())));
        config.alpn_protocols = alpn.clone();
        config.session_storage = Arc::new(Fresh::new(self.shared.clone(), || {
            ServerSessionMemoryCache::new(SERVER_SESSIONS)
        }));
        let config = Arc::new(config);
        servers.push((alpn, config.clone()));
        config
    }

    /// Client side of an mTLS outbound to `expected`.
    ///
    /// Cached per (`expected`, `alpn`): call it per connection; the server name given to
    /// rustls is not checked (any fixed name does), the SPIFFE ID is.
    pub fn client_config(
        self: &Arc<Self>,
        expected: &SpiffeId,
        alpn: Vec<Vec<u8>>,
    ) -> Arc<rustls::ClientConfig> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = clients
            .get(expected)
            .and_then(|v| v.iter().find(|(a, _)| *a == alpn))
        {
            return c.clone();
        }
        let mut config = ClientConfig::builder_with_provider(provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                shared: self.shared.clone(),
                expected: expected.clone(),
            }))
            .with_client_cert_resolver(Arc::new(CurrentKey(self.shared.clone())));
        config.alpn_protocols = alpn.clone();
        config.resumption = Resumption::store(Arc::new(Fresh::new(self.shared.clone(), || {
            Arc::new(ClientSessionMemoryCache::new(CLIENT_SESSIONS))
        })));
        let config = Arc::new(config);
        clients
            .entry(expected.clone())
            .or_default()
            .push((alpn, config.clone()));
        config
    }
}

/// Resumable sessions kept by a server configuration (shared by every client).
const SERVER_SESSIONS: usize = 1024;
/// Tickets kept by a client configuration (one expected identity, one server name).
const CLIENT_SESSIONS: usize = 8;

/// A session cache that starts over after every `install`.
struct Fresh<T> {
    shared: Arc<Shared>,
    make: fn() -> Arc<T>,
    inner: Mutex<(u64, Option<Arc<T>>)>,
}

impl<T> Fresh<T> {
    fn new(shared: Arc<Shared>, make: fn() -> Arc<T>) -> Fresh<T> {
        Fresh {
            shared,
            make,
            inner: Mutex::new((0, None)),
        }
    }

    fn get(&self) -> Arc<T> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &inner.1 {
            Some(t) if inner.0 == generation => t.clone(),
            _ => {
                let t = (self.make)();
                *inner = (generation, Some(t.clone()));
                t
            }
        }
    }
}

impl<T> fmt::Debug for Fresh<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fresh")
    }
}

impl StoresServerSessions for Fresh<ServerSessionMemoryCache> {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.get().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        Fresh::get(self).get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.get().take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

impl ClientSessionStore for Fresh<ClientSessionMemoryCache> {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.get().set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.get().kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        _server_name: ServerName<'static>,
        _value: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(
        &self,
        _server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _server_name: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.get().insert_tls13_ticket(server_name, value)
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.get().take_tls13_ticket(server_name)
    }
}

/// The SNI of an outbound connection to `service` in `zone`: `<service>.<zone>.<mesh>.weft`
/// ([`weft_core::names::Sni`]). It names the target zone so that another zone's ingress can
/// route the connection by SNI without terminating TLS. [`Identity::client_config`] checks the
/// server's SPIFFE ID, never this name; the inbound ignores it.
pub fn sni(mesh: &str, service: &str, zone: &str) -> Result<ServerName<'static>, String> {
    let sni = weft_core::names::Sni::new(mesh, service, zone).to_string();
    ServerName::try_from(sni.as_str())
        .map(|n| n.to_owned())
        .map_err(|e| {
            format!("SNI {sni:?} (mesh {mesh:?}, service {service:?}, zone {zone:?}): {e}")
        })
}

/// Serves the current certified key to both sides.
struct CurrentKey(Arc<Shared>);

impl fmt::Debug for CurrentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentKey")
    }
}

impl ResolvesServerCert for CurrentKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|m| m.key.clone())
    }
}

impl ResolvesClientCert for CurrentKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|m| m.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Requires a client certificate of this mesh, chained to a current root.
struct ClientVerifier(Arc<Shared>);

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientVerifier")
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify(end_entity, intermediates, now)?;
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

/// Accepts only a server chained to a current root that carries exactly `expected`.
struct ServerVerifier {
    shared: Arc<Shared>,
    expected: SpiffeId,
}

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.shared.verify(end_entity, intermediates, now)?;
        if id != self.expected {
            tracing::debug!(%id, expected = %self.expected, "server identity is not the expected one");
            return Err(other(VerifyError(format!(
                "server is {id}, expected {}",
                self.expected
            ))));
        }
        Ok(ServerCertVerified::assertion())
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

/// The verified SPIFFE ID of the peer of an established connection.
///
/// Only meaningful on connections made with [`Identity::server_config`] or
/// [`Identity::client_config`], whose verifiers checked the chain: this reads the leaf's one
/// URI SAN.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    leaf_identity(leaf)
}

/// The SPIFFE ID (the one URI SAN) of a certificate, unverified.
pub fn leaf_identity(der: &CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut uri = None;
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(u) = name {
                    if uri.is_some() {
                        return None;
                    }
                    uri = Some(*u);
                }
            }
        }
    }
    SpiffeId::parse(uri?).ok()
}

/// The serial (hex) of a certificate, e.g. the peer's leaf: for logs and tests.
pub fn serial_of(der: &CertificateDer<'_>) -> Option<String> {
    cert_facts(der).map(|(_, _, serial)| serial)
}

fn cert_facts(der: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime, String)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let v = cert.validity();
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some((
        time_of(v.not_before.timestamp()),
        time_of(v.not_after.timestamp()),
        serial,
    ))
}

fn time_of(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::HandshakeKind;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::{TlsAcceptor, TlsConnector};
    use weft_core::pki::{IntermediateCa, RootCa};

    const HOUR: Duration = Duration::from_secs(3600);

    /// A mesh's root and one zone intermediate.
    struct Ca {
        root: RootCa,
        zone: IntermediateCa,
    }

    impl Ca {
        fn new(mesh: &str) -> Ca {
            let root = RootCa::generate(mesh, 10 * HOUR).unwrap();
            let key = pki::new_key().unwrap();
            let csr = pki::intermediate_csr(mesh, "east", &key).unwrap();
            let cert = root.sign_intermediate(&csr, "east", 5 * HOUR).unwrap();
            let zone = IntermediateCa::from_pem(&cert, &key, root.cert_pem()).unwrap();
            Ca { root, zone }
        }

        /// (key, chain) for `service`, valid from `now` for `valid_for`.
        fn issue_at(
            &self,
            service: &str,
            now: SystemTime,
            valid_for: Duration,
        ) -> (String, String) {
            let mesh = self.root.mesh();
            let key = pki::new_key().unwrap();
            let csr = pki::workload_csr(mesh, service, &key).unwrap();
            let w = self
                .zone
                .issue_workload(&csr, mesh, service, valid_for, now)
                .unwrap();
            (key, w.chain_pem)
        }

        fn identity(&self, service: &str) -> Arc<Identity> {
            let id = Identity::new(self.root.mesh());
            self.install(&id, service);
            id
        }

        fn install(&self, id: &Identity, service: &str) -> CertStatus {
            let (key, chain) = self.issue_at(service, SystemTime::now(), HOUR);
            id.install(&key, &chain, &[self.root.cert_pem().to_string()])
                .unwrap()
        }
    }

    fn sid(mesh: &str, service: &str) -> SpiffeId {
        SpiffeId::new(mesh, service).unwrap()
    }

    type Pair = (
        tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
        tokio_rustls::server::TlsStream<tokio::io::DuplexStream>,
    );

    /// Handshake both ends in memory and exchange one byte each way, so a refusal on either
    /// side (TLS 1.3 clients finish before the server has checked their certificate) shows.
    async fn connect(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Result<Pair, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (c, s) = tokio::join!(
            TlsConnector::from(client).connect(sni("default", "web", "east").unwrap(), a),
            TlsAcceptor::from(server).accept(b)
        );
        let (mut c, mut s) = match (c, s) {
            (Ok(c), Ok(s)) => (c, s),
            (c, s) => {
                return Err(format!("client: {:?}, server: {:?}", c.err(), s.err()));
            }
        };
        ping(&mut c, &mut s).await?;
        Ok((c, s))
    }

    async fn ping<A, B>(c: &mut A, s: &mut B) -> Result<(), String>
    where
        A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = [0u8; 1];
        c.write_all(b"x").await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        s.write_all(b"y").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// A client presenting any chain, accepting any server: what a rogue or foreign peer does.
    fn raw_client(key_pem: Option<&str>, chain_pem: &str) -> Arc<ClientConfig> {
        #[derive(Debug)]
        struct AnyServer;
        impl ServerCertVerifier for AnyServer {
            fn verify_server_cert(
                &self,
                _: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &ServerName<'_>,
                _: &[u8],
                _: UnixTime,
            ) -> Result<ServerCertVerified, rustls::Error> {
                Ok(ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                Ok(HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                Ok(HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
                provider()
                    .signature_verification_algorithms
                    .supported_schemes()
            }
        }
        let b = ClientConfig::builder_with_provider(provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer));
        Arc::new(match key_pem {
            Some(key) => b
                .with_client_auth_cert(
                    pki::certs_from_pem(chain_pem).unwrap(),
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        })
    }

    #[tokio::test]
    async fn mutual_tls_between_two_services() {
        let ca = Ca::new("default");
        let web = ca.identity("web");
        let backend = ca.identity("backend");
        let (c, s) = connect(
            backend.server_config(vec![]),
            web.client_config(&sid("default", "backend"), vec![]),
        )
        .await
        .unwrap();
        assert_eq!(peer_identity(s.get_ref().1), Some(sid("default", "web")));
        assert_eq!(
            peer_identity(c.get_ref().1),
            Some(sid("default", "backend"))
        );
        assert_eq!(c.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
        // The next connection resumes, and still knows who the peers are.
        let (c, s) = connect(
            backend.server_config(vec![]),
            web.client_config(&sid("default", "backend"), vec![]),
        )
        .await
        .unwrap();
        assert_eq!(c.get_ref().1.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(peer_identity(s.get_ref().1), Some(sid("default", "web")));
        assert_eq!(
            peer_identity(c.get_ref().1),
            Some(sid("default", "backend"))
        );
        // After an install, a full handshake again.
        ca.install(&backend, "backend");
        let (c, _s) = connect(
            backend.server_config(vec![]),
            web.client_config(&sid("default", "backend"), vec![]),
        )
        .await
        .unwrap();
        assert_eq!(c.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
        // Cached: the same configuration for the same arguments.
        assert!(Arc::ptr_eq(
            &backend.server_config(vec![b"h2".to_vec()]),
            &backend.server_config(vec![b"h2".to_vec()])
        ));
        assert!(Arc::ptr_eq(
            &web.client_config(&sid("default", "backend"), vec![]),
            &web.client_config(&sid("default", "backend"), vec![])
        ));
    }

    #[tokio::test]
    async fn client_refuses_a_server_with_another_identity() {
        let ca = Ca::new("default");
        let web = ca.identity("web");
        let impostor = ca.identity("payments");
        let err = connect(
            impostor.server_config(vec![]),
            web.client_config(&sid("default", "backend"), vec![]),
        )
        .await
        .unwrap_err();
        assert!(err.contains("expected spiffe://default/backend"), "{err}");
    }

    #[tokio::test]
    async fn server_refuses_other_mesh_expired_and_missing_certificates() {
        let ca = Ca::new("default");
        let backend = ca.identity("backend");
        let server = backend.server_config(vec![]);

        // The same identity name, from another mesh's root ("default" there too).
        let other = Ca::new("default");
        let (key, chain) = other.issue_at("web", SystemTime::now(), HOUR);
        let err = connect(server.clone(), raw_client(Some(&key), &chain))
            .await
            .unwrap_err();
        assert!(err.contains("not trusted"), "{err}");

        // A mesh named otherwise.
        let shop = Ca::new("shop");
        let (key, chain) = shop.issue_at("web", SystemTime::now(), HOUR);
        assert!(
            connect(server.clone(), raw_client(Some(&key), &chain))
                .await
                .is_err()
        );

        // Expired.
        let (key, chain) = ca.issue_at("web", SystemTime::now() - 3 * HOUR, HOUR);
        let err = connect(server.clone(), raw_client(Some(&key), &chain))
            .await
            .unwrap_err();
        assert!(err.contains("expired"), "{err}");

        // No client certificate.
        let err = connect(server.clone(), raw_client(None, ""))
            .await
            .unwrap_err();
        assert!(err.contains("server: Some"), "{err}");

        // And a good one still works: the refusals are about the client.
        let (key, chain) = ca.issue_at("web", SystemTime::now(), HOUR);
        connect(server, raw_client(Some(&key), &chain))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn install_refuses_bad_material_and_keeps_the_old() {
        let ca = Ca::new("default");
        let id = ca.identity("web");
        let before = id.status().unwrap();
        let roots = [ca.root.cert_pem().to_string()];
        let (key, chain) = ca.issue_at("web", SystemTime::now(), HOUR);
        let (other_key, _) = ca.issue_at("web", SystemTime::now(), HOUR);
        let err = id.install(&other_key, &chain, &roots).unwrap_err();
        assert!(format!("{err:#}").contains("does not match"), "{err:#}");
        let foreign = Ca::new("default");
        let err = id
            .install(&key, &chain, &[foreign.root.cert_pem().to_string()])
            .unwrap_err();
        assert!(format!("{err:#}").contains("does not verify"), "{err:#}");
        let shop = Ca::new("shop");
        let (skey, schain) = shop.issue_at("web", SystemTime::now(), HOUR);
        let err = id
            .install(&skey, &schain, &[shop.root.cert_pem().to_string()])
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("outside mesh default"),
            "{err:#}"
        );
        assert_eq!(id.status().unwrap(), before);
        assert!(Identity::new("default").status().is_none());
    }

    #[tokio::test]
    async fn rotation_keeps_open_connections_and_applies_to_new_handshakes() {
        let ca = Ca::new("default");
        let web = ca.identity("web");
        let backend = ca.identity("backend");
        let first = backend.status().unwrap();
        let client = || web.client_config(&sid("default", "backend"), vec![]);
        let (mut c, mut s) = connect(backend.server_config(vec![]), client())
            .await
            .unwrap();
        let serial = |c: &rustls::CommonState| serial_of(&c.peer_certificates().unwrap()[0]);
        assert_eq!(serial(c.get_ref().1), Some(first.serial.clone()));

        let second = ca.install(&backend, "backend");
        assert_ne!(first.serial, second.serial);
        assert_eq!(backend.status().unwrap(), second);
        // The open connection goes on with what it negotiated.
        ping(&mut c, &mut s).await.unwrap();
        assert_eq!(serial(c.get_ref().1), Some(first.serial.clone()));
        // New handshakes present the new certificate (no session resumed from before).
        let (c2, _s2) = connect(backend.server_config(vec![]), client())
            .await
            .unwrap();
        assert_eq!(serial(c2.get_ref().1), Some(second.serial));
        ping(&mut c, &mut s).await.unwrap();
    }

    #[tokio::test]
    async fn new_roots_apply_to_the_next_handshake() {
        let ca = Ca::new("default");
        let web = ca.identity("web");
        let backend = ca.identity("backend");
        let server = backend.server_config(vec![]);
        connect(
            server.clone(),
            web.client_config(&sid("default", "backend"), vec![]),
        )
        .await
        .unwrap();
        // The mesh moves to a new root: backend gets a certificate from it and trusts only it.
        let next = Ca::new("default");
        next.install(&backend, "backend");
        assert!(
            connect(
                backend.server_config(vec![]),
                web.client_config(&sid("default", "backend"), vec![])
            )
            .await
            .is_err()
        );
        // Even through a configuration fetched before the change.
        assert!(
            connect(
                server,
                web.client_config(&sid("default", "backend"), vec![])
            )
            .await
            .is_err()
        );
    }
}
