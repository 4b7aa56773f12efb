//! The egress data path in-process, over real TLS on loopback: a caller with a mesh
//! certificate, the egress with its per-mesh certificate (asked for and installed like the
//! session does), and an external TLS echo server verified against a test CA.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use weft_core::pki::{self, IntermediateCa, RootCa};
use weft_ingress::egress::{self, Certs, Upstream};
use weft_ingress::metrics::Metrics;
use weft_ingress::proxy;
use weft_ingress::table::Routes;
use weft_proto::dataplane::v1 as pb;

const MESH: &str = "default";

struct Ca {
    root: RootCa,
    zone: IntermediateCa,
}

impl Ca {
    fn new() -> Ca {
        let hour = Duration::from_secs(3600);
        let root = RootCa::generate(MESH, 10 * hour).unwrap();
        let key = pki::new_key().unwrap();
        let csr = pki::intermediate_csr(MESH, "east", &key).unwrap();
        let cert = root.sign_intermediate(&csr, "east", 5 * hour).unwrap();
        let zone = IntermediateCa::from_pem(&cert, &key, root.cert_pem()).unwrap();
        Ca { root, zone }
    }

    fn issue(&self, csr: &str, service: &str) -> pki::WorkloadCert {
        self.zone
            .issue_workload(
                csr,
                MESH,
                service,
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap()
    }
}

/// The caller's side: verifies the egress's identity like weft-dp does.
#[derive(Debug)]
struct EgressVerifier {
    root: CertificateDer<'static>,
}

impl ServerCertVerifier for EgressVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        let id = pki::verify_workload(&chain, &self.root, SystemTime::now())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if id.to_string() != "spiffe://default/zone-egress.east" {
            return Err(rustls::Error::General(format!("server is {id}")));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
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
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS echo server for `localhost` (self-signed); records the SNIs it saw.
async fn external_tls_echo() -> (u16, String, Arc<Mutex<Vec<String>>>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_pem = cert.cert.pem();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.cert.der().clone()],
        PrivateKeyDer::from_pem_slice(cert.signing_key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let snis = Arc::new(Mutex::new(Vec::new()));
    let seen = snis.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("").to_string();
                seen.lock().unwrap().push(sni);
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    if tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, cert_pem, snis)
}

fn external(name: &str, port: u16, server_name: &str, default_deny: bool) -> pb::ServiceEndpoints {
    pb::ServiceEndpoints {
        service: name.into(),
        mesh: MESH.into(),
        protocol: "tcp".into(),
        endpoints: vec![pb::Endpoint {
            address: "127.0.0.1".into(),
            port: u32::from(port),
            ..Default::default()
        }],
        external: Some(pb::ExternalService {
            tls: true,
            server_name: server_name.into(),
            verification_mode: "Secured".into(),
            permissions_json: String::new(),
            default_deny,
        }),
    }
}

#[tokio::test]
async fn tls_origination_permissions_and_the_callers_identity() {
    let ca = Ca::new();
    let (ext_port, ext_ca_pem, snis) = external_tls_echo().await;

    // The egress's certificate, asked for and installed as the session does.
    let certs = Arc::new(Certs::default());
    let asked = certs.requests([MESH], "zone-egress.east");
    assert_eq!(asked.len(), 1);
    assert!(
        certs.requests([MESH], "zone-egress.east").is_empty(),
        "one outstanding request per mesh"
    );
    let w = ca.issue(&asked[0].1, "zone-egress.east");
    let not_after = w.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    certs
        .install(
            MESH,
            &w.chain_pem,
            &[ca.root.cert_pem().to_string()],
            not_after,
        )
        .unwrap();
    assert!(
        certs.requests([MESH], "zone-egress.east").is_empty(),
        "not due"
    );

    let routes = Routes::new();
    routes.set_zone("east");
    routes
        .apply(&pb::Update {
            nonce: 1,
            full: true,
            services: vec![
                external("secure-api", ext_port, "localhost", false),
                external("closed-api", ext_port, "localhost", true),
                external("wrong-name", ext_port, "other.example", false),
            ],
            ..Default::default()
        })
        .unwrap();
    let metrics = Arc::new(Metrics::with_prefix("weft_egress"));
    let upstream = Upstream::new(egress::external_roots(&ext_ca_pem).unwrap()).unwrap();
    let ctx = egress::Context {
        base: proxy::Context::new(routes.clone(), metrics.clone()),
        certs,
        upstream: Arc::new(upstream),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(egress::serve(listener, ctx));

    // The caller: service web of the mesh.
    let key = pki::new_key().unwrap();
    let csr = pki::workload_csr(MESH, "web", &key).unwrap();
    let web = ca.issue(&csr, "web");
    let chain: Vec<CertificateDer<'static>> = pki::certs_from_pem(&web.chain_pem).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(EgressVerifier {
        root: pki::certs_from_pem(ca.root.cert_pem()).unwrap().remove(0),
    }))
    .with_client_auth_cert(
        chain,
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let call = |service: &'static str| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let sni = ServerName::try_from(format!("{service}.east.default.weft")).unwrap();
            let mut tls = connector.connect(sni, tcp).await.unwrap();
            tls.write_all(b"ping").await.unwrap();
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let mut b = [0u8; 64];
                while let Ok(n @ 1..) = tls.read(&mut b).await {
                    buf.extend_from_slice(&b[..n]);
                    if buf.len() >= 4 {
                        break;
                    }
                }
            })
            .await;
            buf
        }
    };

    // Allowed: TLS to the external host with the configured server name, bytes both ways.
    assert_eq!(call("secure-api").await, b"ping");
    assert_eq!(*snis.lock().unwrap(), ["localhost"]);
    let text = metrics.render();
    assert!(
        text.contains("weft_egress_connections_total{mesh=\"default\",service=\"secure-api\"} 1"),
        "{text}"
    );

    // Denied (defaultDeny, no permission): closed, nothing reaches the host.
    assert_eq!(call("closed-api").await, b"");
    assert_eq!(snis.lock().unwrap().len(), 1);
    assert!(
        metrics
            .render()
            .contains("weft_egress_refused_total{reason=\"denied\"} 1")
    );

    // The external certificate is not for the configured name: no connection.
    assert_eq!(call("wrong-name").await, b"");
    assert!(
        metrics
            .render()
            .contains("weft_egress_upstream_connect_failures_total 1")
    );

    // Not an external service of this zone.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let sni = ServerName::try_from("backend.west.default.weft").unwrap();
    assert!(connector.connect(sni, tcp).await.is_err());
    assert!(
        metrics
            .render()
            .contains("weft_egress_refused_total{reason=\"other_zone\"} 1")
    );
}
