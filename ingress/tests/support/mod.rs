//! Test support: a CA and certificates (rcgen), real rustls TLS backends that require a client
//! certificate, a real rustls client, the ingress's listener and admin endpoint on loopback,
//! and a tiny HTTP/1.1 GET for the admin endpoint.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weft_ingress::metrics::Metrics;
use weft_ingress::table::Routes;
use weft_ingress::{admin, proxy, session};
use weft_proto::dataplane::v1 as pb;

pub const WAIT: Duration = Duration::from_secs(10);
pub const SNI: &str = "backend.east.payments.weft";

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test CA: the mesh root both proxies trust.
pub struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key.
pub struct Leaf {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Pki {
    pub fn new() -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test mesh root");
        Pki {
            ca: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.as_ref().der().clone()
    }

    pub fn ca_pem(&self) -> String {
        self.ca.as_ref().pem()
    }

    pub fn issue(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &*self.ca).unwrap();
        Leaf {
            cert: cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// A certificate and key as PEM (for tonic).
    pub fn issue_pem(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &*self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der()).unwrap();
        Arc::new(roots)
    }

    /// A server config that requires a client certificate from this CA.
    pub fn server_config(&self, leaf: &Leaf) -> Arc<rustls::ServerConfig> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
                .build()
                .unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(vec![leaf.cert.clone()], leaf.key.clone_key())
                .unwrap(),
        )
    }

    /// A client config presenting `leaf`, trusting this CA.
    pub fn client_config(&self, leaf: &Leaf) -> Arc<rustls::ClientConfig> {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(self.roots())
                .with_client_auth_cert(vec![leaf.cert.clone()], leaf.key.clone_key())
                .unwrap(),
        )
    }
}

/// A TLS backend (the local proxy's inbound, in real life): requires a client certificate;
/// per connection it reports the client's certificate, reads until the client's close
/// (half-close), then answers `<name>: <what it read>` and closes.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub cert: CertificateDer<'static>,
    /// The client certificate of each connection, in order.
    pub clients: mpsc::UnboundedReceiver<CertificateDer<'static>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(pki: &Pki, name: &str) -> Backend {
        Backend::start_for(pki, name, SNI).await
    }

    /// A backend whose certificate is for `server_name`.
    pub async fn start_for(pki: &Pki, name: &str, server_name: &str) -> Backend {
        let leaf = pki.issue(&[server_name]);
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&leaf));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, clients) = mpsc::unbounded_channel();
        let who = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, tx, who) = (acceptor.clone(), tx.clone(), who.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Some(c) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                        let _ = tx.send(c.clone().into_owned());
                    }
                    let mut got = Vec::new();
                    if tls.read_to_end(&mut got).await.is_err() {
                        return;
                    }
                    let answer = format!("{who}: {}", String::from_utf8_lossy(&got));
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            cert: leaf.cert,
            clients,
            task,
        }
    }

    pub fn endpoint(&self) -> pb::Endpoint {
        endpoint(self.addr.port(), &self.name)
    }
}

pub fn endpoint(port: u16, dataplane: &str) -> pb::Endpoint {
    pb::Endpoint {
        address: "127.0.0.1".into(),
        port: u32::from(port),
        dataplane: dataplane.into(),
        zone: "east".into(),
        weight: 1,
        ..Default::default()
    }
}

pub fn service(mesh: &str, name: &str, endpoints: Vec<pb::Endpoint>) -> pb::ServiceEndpoints {
    pb::ServiceEndpoints {
        service: name.into(),
        mesh: mesh.into(),
        protocol: "tcp".into(),
        endpoints,
        external: None,
    }
}

/// A port nothing listens on (bound, then closed).
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// The ingress's data path and admin endpoint on loopback, on a table built directly.
pub struct Ingress {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub routes: Routes,
    pub ctx: proxy::Context,
    stop: CancellationToken,
}

impl Drop for Ingress {
    fn drop(&mut self) {
        self.stop.cancel();
        self.ctx.draining.cancel();
    }
}

impl Ingress {
    /// Zone `east`, with `services` as the first (full) update.
    pub async fn start(services: Vec<pb::ServiceEndpoints>) -> Ingress {
        Self::start_with(services, proxy::Timing::default()).await
    }

    pub async fn start_with(services: Vec<pb::ServiceEndpoints>, timing: proxy::Timing) -> Ingress {
        let routes = Routes::new();
        routes.set_zone("east");
        routes
            .apply(&pb::Update {
                nonce: 1,
                full: true,
                services,
                ..Default::default()
            })
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut ctx = proxy::Context::new(routes.clone(), metrics.clone());
        ctx.timing = timing;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(proxy::serve(listener, ctx.clone()));
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin_listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let a = Arc::new(admin::Admin {
            name: "ingress-1".into(),
            routes: routes.clone(),
            metrics,
            session: Arc::new(session::Status::default()),
            draining: ctx.draining.clone(),
            certs: None,
        });
        tokio::spawn(admin::serve(admin_listener, a, stop.clone()));
        Ingress {
            addr,
            admin: admin_addr,
            routes,
            ctx,
            stop,
        }
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Wait until `/metrics` has the sample `line` (name, labels and value).
    pub async fn assert_metric(&self, line: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let body = self.metrics().await;
            if body.lines().any(|l| l == line) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no sample {line:?} in /metrics:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `GET path` over HTTP/1.1; the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("the admin endpoint answers in time")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// What a client saw on one connection through the ingress.
pub struct Exchange {
    /// The server's certificate, as the client saw it in the handshake.
    pub server_cert: CertificateDer<'static>,
    /// The backend's answer.
    pub answer: String,
}

/// A real rustls client with a client certificate: connect to `addr` with `sni`, send `msg`,
/// half-close, read the answer.
pub async fn exchange(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
    msg: &str,
) -> std::io::Result<Exchange> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("the handshake ends in time")?;
    let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    tls.write_all(msg.as_bytes()).await?;
    tls.shutdown().await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut answer))
        .await
        .expect("the answer comes in time")?;
    Ok(Exchange {
        server_cert,
        answer: String::from_utf8(answer).unwrap(),
    })
}
