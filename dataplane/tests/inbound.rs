//! The inbound listener on loopback, with real TLS and real HTTP: mTLS and the caller's
//! identity reaching the application, refusals, MeshTrafficPermission per request and per
//! connection, certificate rotation under an open connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_core::pki::{self, IntermediateCa, RootCa, SpiffeId};
use weft_core::spec::fields::Protocol;
use weft_dp::inbound::{self, Inbound};
use weft_dp::metrics::Metrics;
use weft_dp::state::{Context, Labels, State};
use weft_dp::tls::{self, Identity};
use weft_proto::dataplane::v1 as pb;

const HOUR: Duration = Duration::from_secs(3600);
const MESH: &str = "default";

/// A mesh root and a zone intermediate that issues workload certificates.
struct Ca {
    root: RootCa,
    zone: IntermediateCa,
}

impl Ca {
    fn new() -> Ca {
        let root = RootCa::generate(MESH, 10 * HOUR).unwrap();
        let key = pki::new_key().unwrap();
        let csr = pki::intermediate_csr(MESH, "east", &key).unwrap();
        let cert = root.sign_intermediate(&csr, "east", 5 * HOUR).unwrap();
        let zone = IntermediateCa::from_pem(&cert, &key, root.cert_pem()).unwrap();
        Ca { root, zone }
    }

    fn install(&self, id: &Identity, service: &str) -> tls::CertStatus {
        let key = pki::new_key().unwrap();
        let csr = pki::workload_csr(MESH, service, &key).unwrap();
        let w = self
            .zone
            .issue_workload(&csr, MESH, service, HOUR, SystemTime::now())
            .unwrap();
        id.install(&key, &w.chain_pem, &[self.root.cert_pem().to_string()])
            .unwrap()
    }

    fn identity(&self, service: &str) -> Arc<Identity> {
        let id = Identity::new(MESH);
        self.install(&id, service);
        id
    }
}

/// The view of the `backend` proxy: one inbound on `port`; `from` is MeshTrafficPermission's
/// `from` entries as (source service, action).
fn view(mtls: bool, default_deny: bool, port: u16, from: &[(&str, &str)]) -> String {
    let from: Vec<_> = from
        .iter()
        .map(|(service, action)| {
            serde_json::json!({
                "targetRef": {"kind": "MeshService", "name": service},
                "conf": {"action": action},
            })
        })
        .collect();
    serde_json::json!({
        "mesh": MESH,
        "dataplane": "backend-1",
        "mtls": mtls,
        "defaultDeny": default_deny,
        "inbounds": [{
            "port": port,
            "service": "backend",
            "tags": {"weft.io/service": "backend"},
            "from": if from.is_empty() { serde_json::json!({}) } else { serde_json::json!({"MeshTrafficPermission": from}) },
        }],
        "outbounds": {},
    })
    .to_string()
}

fn apply(state: &State, view: String) {
    state
        .apply(&pb::Update {
            nonce: 1,
            full: true,
            view_json: Some(view),
            services: vec![],
            removed_services: vec![],
            vips_replace: false,
            vips: vec![],
        })
        .unwrap();
}

/// The `backend` proxy's inbound in front of `app`.
struct Proxy {
    addr: SocketAddr,
    port: u16,
    ctx: Context,
}

impl Proxy {
    async fn start(
        identity: Arc<Identity>,
        protocol: Protocol,
        app: SocketAddr,
        view: impl Fn(u16) -> String,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let port = 10_000; // the Dataplane's inbound port, as the view names it
        let labels = Labels {
            mesh: MESH.into(),
            zone: "east".into(),
            dataplane: "backend-1".into(),
        };
        let ctx = Context {
            state: State::new(),
            identity,
            metrics: Arc::new(Metrics::new(labels.clone())),
            labels: Arc::new(labels),
            draining: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        apply(&ctx.state, view(port));
        let inbound = Inbound {
            port,
            service: "backend".into(),
            protocol,
            app,
        };
        tokio::spawn(inbound::run(listener, inbound, ctx.clone()));
        Proxy { addr, port, ctx }
    }

    fn apply(&self, view: impl Fn(u16) -> String) {
        apply(&self.ctx.state, view(self.port));
    }

    fn metrics(&self) -> String {
        self.ctx.metrics.render(&self.ctx.identity)
    }
}

/// An application answering every request (HTTP/1.1 or HTTP/2) with the
/// `x-forwarded-client-cert` it saw.
async fn http_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let xfcc: Vec<_> = req
                            .headers()
                            .get_all("x-forwarded-client-cert")
                            .iter()
                            .map(|v| v.to_str().unwrap().to_string())
                            .collect();
                        let host = req
                            .headers()
                            .get("host")
                            .cloned()
                            .unwrap_or(hyper::header::HeaderValue::from_static("none"));
                        let mut resp = Response::new(Full::new(Bytes::from(format!(
                            "xfcc={}",
                            xfcc.join("|")
                        ))));
                        resp.headers_mut().insert("x-seen-host", host);
                        Ok::<_, Infallible>(resp)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP application that echoes.
async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn backend_id() -> SpiffeId {
    SpiffeId::new(MESH, "backend").unwrap()
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// An mTLS connection to the proxy as `client` (expecting `backend`).
async fn mtls(client: &Arc<Identity>, proxy: &Proxy, alpn: &[&[u8]]) -> std::io::Result<Tls> {
    let config = client.client_config(&backend_id(), alpn.iter().map(|a| a.to_vec()).collect());
    let tcp = TcpStream::connect(proxy.addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(tls::sni("default", "web", "east").unwrap(), tcp)
        .await
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 client connection over `io`.
async fn h1<I>(io: I) -> Sender
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(sender: &mut Sender, headers: &[(&str, &str)]) -> hyper::Result<(StatusCode, String)> {
    sender.ready().await?;
    let mut req = Request::builder().uri("/hello").header("host", "backend");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Poll `f` until it holds, for up to 5 s.
async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn allow_web(port: u16) -> String {
    view(true, true, port, &[("web", "Allow")])
}

fn deny_web(port: u16) -> String {
    view(true, true, port, &[("web", "Deny")])
}

#[tokio::test]
async fn mtls_forwards_with_the_callers_identity() {
    let ca = Ca::new();
    let web = ca.identity("web");
    let proxy = Proxy::start(
        ca.identity("backend"),
        Protocol::Http,
        http_app().await,
        allow_web,
    )
    .await;
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let conn = mtls(&web, &proxy, &[alpn]).await.unwrap();
        assert_eq!(conn.get_ref().1.alpn_protocol(), Some(alpn));
        let (status, body) = if alpn == b"h2" {
            let (mut sender, c) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(conn))
                    .await
                    .unwrap();
            tokio::spawn(c);
            let req = Request::builder()
                .uri("https://backend/hello")
                .header("x-forwarded-client-cert", "By=spiffe://default/evil")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            // HTTP/2 in, HTTP/1.1 to the application: `:authority` becomes `Host`.
            assert_eq!(resp.headers()["x-seen-host"], "backend");
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        } else {
            get(
                &mut h1(conn).await,
                &[("x-forwarded-client-cert", "By=spiffe://default/evil")],
            )
            .await
            .unwrap()
        };
        assert_eq!(status, StatusCode::OK, "{body}");
        // The spoofed header is gone; the proxy's names the verified caller.
        assert_eq!(
            body,
            "xfcc=By=spiffe://default/backend;URI=spiffe://default/web"
        );
    }
    let m = proxy.metrics();
    for want in [
        r#"weft_dp_requests_total{mesh="default",zone="east",direction="inbound",service="backend",code_class="2xx"} 2"#,
        r#"weft_dp_tls_handshakes_total{mesh="default",zone="east",direction="inbound",result="ok"} 2"#,
        "weft_dp_certificate_expiry_timestamp_seconds{",
    ] {
        assert!(m.contains(want), "missing {want} in\n{m}");
    }
}

#[tokio::test]
async fn plaintext_and_certificateless_clients_are_refused() {
    let ca = Ca::new();
    let proxy = Proxy::start(
        ca.identity("backend"),
        Protocol::Http,
        http_app().await,
        allow_web,
    )
    .await;

    // Plaintext HTTP to an mTLS inbound.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut sender = h1(tcp).await;
    assert!(get(&mut sender, &[]).await.is_err());

    // TLS without a client certificate.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_no_client_auth();
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let refused = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(tls::sni("default", "web", "east").unwrap(), tcp)
        .await
    {
        // TLS 1.3: the client may finish first; the refusal shows on first use.
        Ok(conn) => get(&mut h1(conn).await, &[]).await.is_err(),
        Err(_) => true,
    };
    assert!(refused);

    // A certificate from another mesh root of the same name.
    let rogue = Ca::new().identity("web");
    let refused = match mtls(&rogue, &proxy, &[b"http/1.1"]).await {
        Ok(conn) => get(&mut h1(conn).await, &[]).await.is_err(),
        Err(_) => true,
    };
    assert!(refused);

    let want = r#"weft_dp_tls_handshakes_total{mesh="default",zone="east",direction="inbound",result="failed"} 3"#;
    eventually(want, || proxy.metrics().contains(want)).await;
}

#[tokio::test]
async fn permission_changes_apply_to_a_kept_alive_connection() {
    let ca = Ca::new();
    let web = ca.identity("web");
    let proxy = Proxy::start(
        ca.identity("backend"),
        Protocol::Http,
        http_app().await,
        allow_web,
    )
    .await;
    let mut sender = h1(mtls(&web, &proxy, &[b"http/1.1"]).await.unwrap()).await;
    assert_eq!(get(&mut sender, &[]).await.unwrap().0, StatusCode::OK);

    proxy.apply(deny_web);
    let (status, body) = get(&mut sender, &[]).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body.trim(),
        "weft: web is not allowed to call backend (MeshTrafficPermission)"
    );

    proxy.apply(allow_web);
    let (status, body) = get(&mut sender, &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");

    // No permission and the mesh's default deny: denied too; without default deny: allowed.
    proxy.apply(|port| view(true, true, port, &[]));
    assert_eq!(
        get(&mut sender, &[]).await.unwrap().0,
        StatusCode::FORBIDDEN
    );
    proxy.apply(|port| view(true, false, port, &[]));
    assert_eq!(get(&mut sender, &[]).await.unwrap().0, StatusCode::OK);

    let m = proxy.metrics();
    let want = r#"weft_dp_authz_denied_total{mesh="default",zone="east",direction="inbound",service="backend",source="web"} 2"#;
    assert!(m.contains(want), "missing {want} in\n{m}");
}

#[tokio::test]
async fn grpc_denied_gets_grpc_status_permission_denied() {
    let ca = Ca::new();
    let web = ca.identity("web");
    let proxy = Proxy::start(
        ca.identity("backend"),
        Protocol::Grpc,
        http_app().await,
        deny_web,
    )
    .await;
    let conn = mtls(&web, &proxy, &[b"h2"]).await.unwrap();
    let (mut sender, c) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(conn))
            .await
            .unwrap();
    tokio::spawn(c);
    let call = || {
        Request::builder()
            .method("POST")
            .uri("https://backend/pkg.Svc/Call")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let resp = sender.send_request(call()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "7");
    assert_eq!(
        resp.headers()["grpc-message"],
        "weft: web is not allowed to call backend (MeshTrafficPermission)"
    );
    // Allowed: the application answers over HTTP/2 (prior knowledge).
    proxy.apply(allow_web);
    let resp = sender.send_request(call()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("grpc-status").is_none());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        b"xfcc=By=spiffe://default/backend;URI=spiffe://default/web"
    );
}

/// Read until the connection ends; the error kind if it ended with one.
async fn read_end<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<std::io::ErrorKind> {
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return None,
                Ok(_) => continue,
                Err(e) => return Some(e.kind()),
            }
        }
    })
    .await;
    r.expect("the connection did not end")
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, msg);
}

#[tokio::test]
async fn tcp_denied_connections_are_reset() {
    let ca = Ca::new();
    let web = ca.identity("web");
    let proxy = Proxy::start(
        ca.identity("backend"),
        Protocol::Tcp,
        echo_app().await,
        deny_web,
    )
    .await;

    // Denied when it starts.
    let mut conn = mtls(&web, &proxy, &[]).await.unwrap();
    let _ = conn.write_all(b"hello").await;
    let _ = conn.flush().await;
    assert_eq!(
        read_end(&mut conn).await,
        Some(std::io::ErrorKind::ConnectionReset)
    );

    // Allowed, then denied while open.
    proxy.apply(allow_web);
    let mut conn = mtls(&web, &proxy, &[]).await.unwrap();
    echo(&mut conn, b"hello").await;
    proxy.apply(deny_web);
    assert_eq!(
        read_end(&mut conn).await,
        Some(std::io::ErrorKind::ConnectionReset)
    );

    let m = proxy.metrics();
    let want = r#"weft_dp_authz_denied_total{mesh="default",zone="east",direction="inbound",service="backend",source="web"} 2"#;
    assert!(m.contains(want), "missing {want} in\n{m}");
}

#[tokio::test]
async fn tcp_to_an_unreachable_application_is_closed() {
    let ca = Ca::new();
    let web = ca.identity("web");
    let gone = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(ca.identity("backend"), Protocol::Tcp, gone, allow_web).await;
    let mut conn = mtls(&web, &proxy, &[]).await.unwrap();
    // Closed cleanly (TLS close_notify, not a reset: nobody denied anything).
    assert_eq!(read_end(&mut conn).await, None);
}

#[tokio::test]
async fn rotation_keeps_open_connections() {
    let ca = Ca::new();
    let web = ca.identity("web");
    let backend = ca.identity("backend");
    let first = backend.status().unwrap();
    let proxy = Proxy::start(backend.clone(), Protocol::Http, http_app().await, allow_web).await;

    let conn = mtls(&web, &proxy, &[b"http/1.1"]).await.unwrap();
    let serial = |c: &Tls| tls::serial_of(&c.get_ref().1.peer_certificates().unwrap()[0]).unwrap();
    assert_eq!(serial(&conn), first.serial);
    let mut sender = h1(conn).await;
    assert_eq!(get(&mut sender, &[]).await.unwrap().0, StatusCode::OK);

    let second = ca.install(&backend, "backend");
    assert_ne!(second.serial, first.serial);
    // The open connection still works.
    assert_eq!(get(&mut sender, &[]).await.unwrap().0, StatusCode::OK);
    // A new one gets the new certificate.
    let conn = mtls(&web, &proxy, &[b"http/1.1"]).await.unwrap();
    assert_eq!(serial(&conn), second.serial);
    assert_eq!(
        get(&mut h1(conn).await, &[]).await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(get(&mut sender, &[]).await.unwrap().0, StatusCode::OK);

    // The same for TCP.
    let tcp = Proxy::start(backend.clone(), Protocol::Tcp, echo_app().await, allow_web).await;
    let mut conn = mtls(&web, &tcp, &[]).await.unwrap();
    echo(&mut conn, b"one").await;
    ca.install(&backend, "backend");
    echo(&mut conn, b"two").await;
}

#[tokio::test]
async fn without_mtls_plaintext_passes_and_permissions_are_not_enforced() {
    let ca = Ca::new();
    let proxy = Proxy::start(
        ca.identity("backend"),
        Protocol::Http,
        http_app().await,
        |port| view(false, true, port, &[("web", "Deny")]),
    )
    .await;
    let mut sender = h1(TcpStream::connect(proxy.addr).await.unwrap()).await;
    let (status, body) = get(&mut sender, &[("x-forwarded-client-cert", "By=x")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "xfcc=");
}

#[tokio::test]
async fn unreachable_application_gets_502() {
    let ca = Ca::new();
    let web = ca.identity("web");
    // A port nobody listens on.
    let gone = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(ca.identity("backend"), Protocol::Http, gone, allow_web).await;
    let mut sender = h1(mtls(&web, &proxy, &[b"http/1.1"]).await.unwrap()).await;
    let (status, _) = get(&mut sender, &[]).await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let m = proxy.metrics();
    let want = r#"code_class="5xx"} 1"#;
    assert!(m.contains(want), "missing {want} in\n{m}");
}

#[tokio::test]
async fn draining_stops_accepting_and_closes_idle_http_connections() {
    let ca = Ca::new();
    let web = ca.identity("web");
    let proxy = Proxy::start(
        ca.identity("backend"),
        Protocol::Http,
        http_app().await,
        allow_web,
    )
    .await;
    let mut conn = mtls(&web, &proxy, &[b"http/1.1"]).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nhost: backend\r\n\r\n")
        .await
        .unwrap();
    conn.flush().await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    proxy.ctx.draining.cancel();
    proxy.ctx.tasks.close();
    // The idle kept-alive connection is closed, the connection tasks finish.
    assert_eq!(read_end(&mut conn).await, None);
    tokio::time::timeout(Duration::from_secs(5), proxy.ctx.tasks.wait())
        .await
        .expect("connection tasks finish after draining");
    eventually("the listener stops accepting", || {
        std::net::TcpStream::connect(proxy.addr).is_err()
    })
    .await;
}

#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// MeshTimeout (the inbound's `rules`)

/// A plaintext mesh's view whose inbound has the MeshTimeout rules conf `timeout`.
fn view_with_timeout(port: u16, timeout: serde_json::Value) -> String {
    serde_json::json!({
        "mesh": MESH,
        "dataplane": "backend-1",
        "mtls": false,
        "inbounds": [{
            "port": port,
            "service": "backend",
            "tags": {"weft.io/service": "backend"},
            "rules": {"MeshTimeout": timeout},
        }],
        "outbounds": {},
    })
    .to_string()
}

#[tokio::test]
async fn request_timeout_to_a_silent_application_is_a_504() {
    // An application that accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            held.push(silent.accept().await.unwrap().0);
        }
    });
    let proxy = Proxy::start(Ca::new().identity("backend"), Protocol::Http, app, |port| {
        view_with_timeout(
            port,
            serde_json::json!({"http": {"requestTimeout": "200ms"}}),
        )
    })
    .await;
    let mut sender = h1(TcpStream::connect(proxy.addr).await.unwrap()).await;
    let start = std::time::Instant::now();
    let (status, body) = get(&mut sender, &[]).await.unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        body.contains("within 200ms (MeshTimeout http.requestTimeout)"),
        "{body}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn tcp_idle_timeout_closes_an_idle_connection() {
    let proxy = Proxy::start(
        Ca::new().identity("backend"),
        Protocol::Tcp,
        echo_app().await,
        |port| view_with_timeout(port, serde_json::json!({"idleTimeout": "300ms"})),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    echo(&mut s, b"ping").await;
    let start = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), read_end(&mut s))
        .await
        .expect("closed within 10 s");
    assert_eq!(end, None, "a clean close, not a reset");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
}
