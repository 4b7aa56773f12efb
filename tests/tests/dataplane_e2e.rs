//! The data plane end to end: a real `weft-global` and `weft-zone`, real `weft-dp` sidecars in
//! front of small HTTP and TCP applications, mTLS between the sidecars with workload
//! certificates the zone issues, MeshTrafficPermission applied on global, certificate
//! rotation, a zone killed under load, and an instance killed behind a balanced service.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use weft_tests::dp::{App, Dataplane, Load};
use weft_tests::{Backend, Global, Zone, client, eventually, free_port, ok};

const SYNC: Duration = Duration::from_secs(30);

/// The default mesh with mTLS on (builtin CA), proxy certificates valid for `lifetime`.
fn mtls_mesh(lifetime: &str) -> Value {
    json!({
        "type": "Mesh",
        "name": "default",
        "spec": {
            "mtls": {
                "enabledBackend": "ca-1",
                "backends": [{
                    "name": "ca-1",
                    "type": "builtin",
                    "dpCert": {"rotation": {"expiration": lifetime}},
                }],
            },
        },
    })
}

/// MeshTrafficPermission `name` on every proxy of the mesh for callers of service `from`.
fn permission(name: &str, from: &str, action: &str) -> Value {
    let source = if from == "*" {
        json!({"kind": "Mesh"})
    } else {
        json!({"kind": "MeshService", "name": from})
    };
    json!({
        "type": "MeshTrafficPermission",
        "name": name,
        "mesh": "default",
        "spec": {
            "targetRef": {"kind": "Mesh"},
            "from": [{"targetRef": source, "default": {"action": action}}],
        },
    })
}

/// Global with an mTLS mesh that allows everything, and zone `east` with its intermediate CA
/// for the mesh.
async fn setup(lifetime: &str) -> (Global, Zone) {
    let g = Global::start(Backend::Memory).await.unwrap();
    g.api()
        .apply(&[mtls_mesh(lifetime), permission("allow-all", "*", "Allow")])
        .await
        .unwrap();
    let zone = Zone::join("east", &g, &[]).await.unwrap();
    zone.wait_synced(SYNC).await;
    zone.wait_mesh_ca("default", SYNC).await;
    (g, zone)
}

/// An HTTP `backend` (application and sidecar) and a `frontend` sidecar whose outbound on
/// the returned port calls it, once a call goes through.
async fn backend_and_frontend(g: &Global, zone: &Zone) -> (App, Dataplane, Dataplane, u16) {
    let app = App::http("backend-1").await.unwrap();
    let backend = Dataplane::builder("backend-1", "backend")
        .inbound(app.port, "http")
        .start(g, zone)
        .await
        .unwrap();
    let out = free_port();
    let frontend = Dataplane::builder("frontend-1", "frontend")
        .outbound(out, "backend")
        .start(g, zone)
        .await
        .unwrap();
    let http = client();
    eventually("frontend -> backend answers", SYNC, || async {
        get(&http, out).await.ok().filter(|r| r.0 == 200)
    })
    .await;
    (app, backend, frontend, out)
}

/// GET through an outbound: (status, body, x-seen-xfcc).
async fn get(http: &reqwest::Client, port: u16) -> Result<(u16, String, String), String> {
    let r = http
        .get(format!("http://127.0.0.1:{port}/hello"))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = r.status().as_u16();
    let xfcc = r
        .headers()
        .get("x-seen-xfcc")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = r.text().await.map_err(|e| format!("{e:?}"))?;
    Ok((status, body, xfcc))
}

/// Send `ping` over a new TCP connection to `port` and return what comes back (empty when
/// the connection is closed or reset first).
async fn tcp_ping(port: u16) -> Vec<u8> {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return Vec::new();
    };
    if s.write_all(b"ping").await.is_err() {
        return Vec::new();
    }
    let mut buf = vec![0u8; 4];
    match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => buf,
        _ => Vec::new(),
    }
}

/// A TLS client with no certificate that accepts any server certificate.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a client without a mesh certificate gets from `addr`: the bytes of any answer to an
/// HTTP request, or the error.
async fn certless_request(addr: std::net::SocketAddr) -> Result<Vec<u8>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("backend.mesh".try_into().unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET /hello HTTP/1.1\r\nhost: backend\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await {
        Ok(Ok(_)) if buf.is_empty() => Err("closed without an answer".into()),
        Ok(Ok(_)) => Ok(buf),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer in 5s".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_reaches_backend_over_mtls_and_clients_without_a_mesh_certificate_are_refused() {
    let (g, zone) = setup("24h").await;
    let app = App::http("backend-1").await.unwrap();
    let backend = Dataplane::builder("backend-1", "backend")
        .inbound(app.port, "http")
        .start(&g, &zone)
        .await
        .unwrap();
    let out = free_port();
    let mut frontend = Dataplane::builder("frontend-1", "frontend")
        .outbound(out, "backend")
        .start(&g, &zone)
        .await
        .unwrap();

    let http = client();
    let (status, body, xfcc) = eventually("frontend -> backend answers", SYNC, || async {
        get(&http, out).await.ok().filter(|r| r.0 == 200)
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "backend-1"));
    // The backend's sidecar authenticated the caller by its certificate.
    assert!(
        xfcc.contains("URI=spiffe://default/frontend")
            && xfcc.contains("By=spiffe://default/backend"),
        "x-forwarded-client-cert seen by the app: {xfcc:?}"
    );

    // Plaintext to the mTLS inbound: no HTTP answer, the app never sees it.
    let hits = app.hits();
    let mut plain = TcpStream::connect(backend.inbound_address()).await.unwrap();
    let _ = plain
        .write_all(b"GET /hello HTTP/1.1\r\nhost: backend\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {}",
        String::from_utf8_lossy(&answer)
    );
    // TLS without a mesh certificate: refused.
    let refused = certless_request(backend.inbound_address()).await;
    assert!(
        refused.is_err(),
        "a client without a certificate got {refused:?}"
    );
    assert_eq!(app.hits(), hits, "refused connections reached the app");

    // The proxy's certificate: spiffe://default/frontend, from the zone, 24h.
    let config = frontend.config().await.unwrap();
    assert_eq!(
        config["certificate"]["spiffeId"],
        "spiffe://default/frontend"
    );
    assert_eq!(
        frontend.endpoints("backend").await.unwrap(),
        vec![backend.inbound_address().to_string()]
    );
    let metrics = frontend.metrics().await.unwrap();
    assert!(
        metrics.contains("weft_dp_requests_total") && metrics.contains("service=\"backend\""),
        "{metrics}"
    );

    // weftctl against the zone: both proxies online, with certificate expiry.
    let table = ok(zone.weftctl(&["inspect", "dataplanes"]));
    let header = table.lines().next().unwrap();
    for col in ["NAME", "MESH", "ZONE", "SERVICE", "STATUS", "CERT EXPIRES"] {
        assert!(header.contains(col), "{table}");
    }
    for (name, service) in [("backend-1", "backend"), ("frontend-1", "frontend")] {
        let line = table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{table}"));
        assert!(
            line.contains(service) && line.contains("online") && line.contains("east"),
            "{line}"
        );
    }
    let sent: Value = serde_json::from_str(&ok(zone.weftctl(&[
        "inspect",
        "dataplane",
        "frontend-1",
        "--config",
    ])))
    .unwrap();
    assert_eq!(sent["view"]["dataplane"], "frontend-1", "{sent}");
    assert_eq!(
        sent["services"]["backend"]["endpoints"][0]["port"],
        backend.inbound_address().port(),
        "{sent}"
    );

    // SIGTERM: the proxy drains and exits 0; the zone marks it offline.
    frontend.terminate();
    let status = frontend.wait_exit(Duration::from_secs(15)).await.unwrap();
    assert!(
        status.success(),
        "weft-dp exited with {status}:\n{}",
        frontend.logs()
    );
    eventually("frontend-1 offline on the zone", SYNC, || async {
        let table =
            String::from_utf8_lossy(&zone.weftctl(&["inspect", "dataplanes"]).stdout).to_string();
        table
            .lines()
            .any(|l| l.starts_with("frontend-1") && l.contains("offline"))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_permission_applied_on_global_blocks_within_a_second_and_allowing_restores() {
    let (g, zone) = setup("24h").await;
    let app = App::http("backend-1").await.unwrap();
    let echo = App::tcp_echo("echo-1").await.unwrap();
    let _backend = Dataplane::builder("backend-1", "backend")
        .inbound(app.port, "http")
        .start(&g, &zone)
        .await
        .unwrap();
    let _echo = Dataplane::builder("echo-1", "echo")
        .inbound(echo.port, "tcp")
        .start(&g, &zone)
        .await
        .unwrap();
    let (http_out, tcp_out) = (free_port(), free_port());
    let _frontend = Dataplane::builder("frontend-1", "frontend")
        .outbound(http_out, "backend")
        .outbound(tcp_out, "echo")
        .start(&g, &zone)
        .await
        .unwrap();
    let http = client();
    eventually("frontend -> backend answers", SYNC, || async {
        get(&http, http_out).await.ok().filter(|r| r.0 == 200)
    })
    .await;
    eventually("frontend -> echo answers", SYNC, || async {
        (tcp_ping(tcp_out).await == b"ping").then_some(())
    })
    .await;

    // Deny frontend -> everything (more specific than allow-all).
    g.api()
        .apply(&[permission("deny-frontend", "frontend", "Deny")])
        .await
        .unwrap();
    let applied = Instant::now();
    let (status, body, _) = eventually("the call is denied", SYNC, || async {
        get(&http, http_out).await.ok().filter(|r| r.0 != 200)
    })
    .await;
    let took = applied.elapsed();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("MeshTrafficPermission"), "{body}");
    assert!(took < Duration::from_secs(1), "denied after {took:?}");
    eventually("TCP to echo is reset", Duration::from_secs(1), || async {
        tcp_ping(tcp_out).await.is_empty().then_some(())
    })
    .await;
    let denied = echo.hits();

    // Allow again: the same policy with Allow.
    g.api()
        .apply(&[permission("deny-frontend", "frontend", "Allow")])
        .await
        .unwrap();
    let applied = Instant::now();
    eventually("the call is allowed again", SYNC, || async {
        get(&http, http_out).await.ok().filter(|r| r.0 == 200)
    })
    .await;
    let took = applied.elapsed();
    assert!(took < Duration::from_secs(1), "allowed after {took:?}");
    eventually(
        "TCP to echo works again",
        Duration::from_secs(2),
        || async { (tcp_ping(tcp_out).await == b"ping").then_some(()) },
    )
    .await;
    assert!(echo.hits() > denied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let (g, zone) = setup("30s").await;
    let (_app, backend, frontend, out) = backend_and_frontend(&g, &zone).await;
    let first = (
        frontend.cert_serial().await.unwrap(),
        backend.cert_serial().await.unwrap(),
    );
    let expires = frontend.config().await.unwrap()["certificate"]["notAfter"].clone();

    let load = Load::start(
        &format!("http://127.0.0.1:{out}/"),
        4,
        Duration::from_millis(5),
    );
    // 30 s certificates renew at ~70% of their lifetime: two rotations each in ~45 s.
    let mut seen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    seen.insert("frontend", vec![first.0.clone()]);
    seen.insert("backend", vec![first.1.clone()]);
    let deadline = Instant::now() + Duration::from_secs(80);
    while seen.values().any(|s| s.len() < 3) {
        assert!(
            Instant::now() < deadline,
            "certificates seen in 80s: {seen:?}\n{}",
            frontend.logs()
        );
        for (who, dp) in [("frontend", &frontend), ("backend", &backend)] {
            let serial = dp.cert_serial().await.unwrap();
            let s = seen.get_mut(who).unwrap();
            if s.last() != Some(&serial) {
                s.push(serial);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let errors = load.errors();
    let (okays, failed) = load.finish().await;
    assert_eq!(failed, 0, "failed requests during rotation: {errors:?}");
    assert!(okays > 1000, "only {okays} requests in the run");
    let now = frontend.config().await.unwrap()["certificate"]["notAfter"].clone();
    assert_ne!(now, expires, "the certificate in use did not change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_killed_under_load_fails_no_request_and_proxies_reconnect() {
    let (g, mut zone) = setup("24h").await;
    let (_app, _backend, frontend, out) = backend_and_frontend(&g, &zone).await;

    let load = Load::start(
        &format!("http://127.0.0.1:{out}/"),
        4,
        Duration::from_millis(5),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    zone.kill9();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = load.ok();
    zone.restart().await.unwrap();
    // Both proxies register again with the new zone process.
    eventually(
        "both proxies online on the restarted zone",
        SYNC,
        || async {
            let list = zone.api().get("/_inspect/dataplanes").await.ok()??;
            let online = list["items"]
                .as_array()?
                .iter()
                .filter(|d| d["status"] == "online")
                .count();
            (online == 2).then_some(())
        },
    )
    .await;
    // And the frontend's config is whole again (the zone held it until the backend was back).
    eventually("the frontend has the backend endpoint", SYNC, || async {
        (frontend.endpoints("backend").await.ok()?.len() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let errors = load.errors();
    let (okays, failed) = load.finish().await;
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(
        during > 100 && okays > during,
        "requests: {during} before restart, {okays} in all"
    );
    assert_eq!(
        frontend.config().await.unwrap()["connected"],
        true,
        "the frontend is connected to the restarted zone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_three_instances_and_a_killed_one_is_ejected() {
    let (g, zone) = setup("24h").await;
    let mut apps = Vec::new();
    let mut backends = Vec::new();
    for i in 1..=3 {
        let app = App::http(&format!("backend-{i}")).await.unwrap();
        backends.push(
            Dataplane::builder(&format!("backend-{i}"), "backend")
                .inbound(app.port, "http")
                .start(&g, &zone)
                .await
                .unwrap(),
        );
        apps.push(app);
    }
    let out = free_port();
    let frontend = Dataplane::builder("frontend-1", "frontend")
        .outbound(out, "backend")
        .start(&g, &zone)
        .await
        .unwrap();
    eventually("the frontend has 3 backend endpoints", SYNC, || async {
        (frontend.endpoints("backend").await.ok()?.len() == 3).then_some(())
    })
    .await;
    let http = client();
    let mut by_instance: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..300 {
        let (status, body, _) = get(&http, out).await.unwrap();
        assert_eq!(status, 200, "{body}");
        *by_instance.entry(body).or_default() += 1;
    }
    assert_eq!(by_instance.len(), 3, "{by_instance:?}");
    assert!(
        by_instance.values().all(|n| *n >= 60),
        "requests are not spread: {by_instance:?}"
    );

    // Kill instance 2 (its sidecar and its app) under load.
    let load = Load::start(
        &format!("http://127.0.0.1:{out}/"),
        4,
        Duration::from_millis(5),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    backends[1].kill9();
    apps[1].stop();
    let killed_at = apps[1].hits();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed_at_ejection = load.failed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let errors = load.errors();
    let (okays, failed) = load.finish().await;
    assert_eq!(
        failed, failed_at_ejection,
        "requests failed after the ejection: {errors:?}"
    );
    assert!(
        failed <= 4,
        "{failed} requests failed around the kill: {errors:?}"
    );
    assert!(okays > 300, "{okays}");
    assert_eq!(
        apps[1].hits(),
        killed_at,
        "the killed instance got requests"
    );
    eventually("the zone withdrew the killed instance", SYNC, || async {
        (frontend.endpoints("backend").await.ok()?.len() == 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_timeout_applied_on_global_cuts_a_slow_request_with_a_504() {
    let (g, zone) = setup("24h").await;
    let (_app, _backend, frontend, out) = backend_and_frontend(&g, &zone).await;
    let http = client();
    let slow = format!("http://127.0.0.1:{out}/sleep/1500");
    // No MeshTimeout: a 1.5 s answer is waited for.
    let r = http.get(&slow).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());

    g.api()
        .apply(&[json!({
            "type": "MeshTimeout",
            "name": "backend-timeouts",
            "mesh": "default",
            "spec": {
                "targetRef": {"kind": "Mesh"},
                "to": [{
                    "targetRef": {"kind": "MeshService", "name": "backend"},
                    "default": {"http": {"requestTimeout": "500ms"}},
                }],
            },
        })])
        .await
        .unwrap();
    let (took, body) = eventually("the slow call is cut at 500 ms", SYNC, || async {
        let start = Instant::now();
        let r = http.get(&slow).send().await.ok()?;
        let status = r.status().as_u16();
        let body = r.text().await.ok()?;
        (status == 504).then_some((start.elapsed(), body))
    })
    .await;
    assert!(
        body.contains("no response within 500ms (MeshTimeout http.requestTimeout)"),
        "{body}"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1400),
        "answered after {took:?}"
    );
    // Quick calls are not affected, and the proxy's /config shows the policy.
    assert_eq!(get(&http, out).await.unwrap().0, 200);
    let config = frontend.config().await.unwrap();
    assert_eq!(
        config.pointer("/view/outbounds/backend/MeshTimeout/http/requestTimeout"),
        Some(&json!("500ms")),
        "{config}"
    );
}
