//! The data path over real sockets and real TLS, on a routing table built directly (no zone):
//! a rustls client with a client certificate reaches a rustls server that requires one,
//! through the ingress, end to end; refusals are counted by reason; round robin and failover;
//! the ClientHello deadline; the drain.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use weft_ingress::proxy;

/// The handshake is end to end: the client sees the backend's own certificate and the backend
/// sees the client's. A TLS-terminating middlebox could only do that with both keys; the
/// ingress was given none (its whole input is the routing table), so it passed the bytes.
#[tokio::test]
async fn tls_is_end_to_end_through_the_ingress() {
    let pki = Pki::new();
    let mut backend = Backend::start(&pki, "backend-1").await;
    let ingress = Ingress::start(vec![service(
        "payments",
        "backend",
        vec![backend.endpoint()],
    )])
    .await;
    let client = pki.issue(&["frontend.west.payments.weft"]);
    let config = pki.client_config(&client);

    let ex = exchange(ingress.addr, config, SNI, "ping from west")
        .await
        .expect("the exchange works through the ingress");
    assert_eq!(
        ex.server_cert, backend.cert,
        "the client saw the backend's certificate"
    );
    assert_eq!(ex.answer, "backend-1: ping from west");
    let seen = tokio::time::timeout(WAIT, backend.clients.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seen, client.cert,
        "the backend saw the client's certificate"
    );

    ingress
        .assert_metric("weft_ingress_connections_total{mesh=\"payments\",service=\"backend\"} 1")
        .await;
    ingress
        .assert_metric("weft_ingress_active_connections{mesh=\"payments\",service=\"backend\"} 0")
        .await;
    let body = ingress.metrics().await;
    let bytes = |dir: &str| -> u64 {
        let prefix = format!(
            "weft_ingress_bytes_total{{mesh=\"payments\",service=\"backend\",direction=\"{dir}\"}} "
        );
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {body}"))
            .parse()
            .unwrap()
    };
    // Handshake, data and close_notify both ways: well over the payloads.
    assert!(bytes("rx") > 500, "{body}");
    assert!(bytes("tx") > 500, "{body}");

    // /config shows the table.
    let (status, config) = http_get(ingress.admin, "/config").await;
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["zone"], "east");
    assert_eq!(config["services"][0]["mesh"], "payments");
    assert_eq!(config["services"][0]["service"], "backend");
    assert_eq!(
        config["services"][0]["endpoints"][0]["port"],
        backend.addr.port()
    );
    assert!(!config.to_string().contains("PRIVATE KEY"));
}

/// Every refusal closes the connection before anything reaches a backend, and is counted.
#[tokio::test]
async fn refusals_are_closed_and_counted() {
    let pki = Pki::new();
    let backend = Backend::start(&pki, "backend-1").await;
    let ingress = Ingress::start(vec![
        service("payments", "backend", vec![backend.endpoint()]),
        service("payments", "empty", vec![]),
    ])
    .await;
    let client = pki.issue(&["frontend.west.payments.weft"]);
    let config = pki.client_config(&client);

    // Plaintext: closed without an answer.
    let mut s = TcpStream::connect(ingress.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer to plaintext");
    ingress
        .assert_metric("weft_ingress_refused_total{reason=\"plaintext\"} 1")
        .await;

    for (sni, reason) in [
        ("backend.west.payments.weft", "other_zone"),
        ("nope.east.payments.weft", "unknown_service"),
        ("backend.east.shop.weft", "unknown_service"),
        ("empty.east.payments.weft", "no_endpoint"),
        ("backend.example.com", "bad_sni"),
    ] {
        let err = exchange(ingress.addr, config.clone(), sni, "x").await;
        assert!(err.is_err(), "{sni}: the handshake must fail");
        let want = if reason == "unknown_service" && sni.contains("shop") {
            2
        } else {
            1
        };
        ingress
            .assert_metric(&format!(
                "weft_ingress_refused_total{{reason=\"{reason}\"}} {want}"
            ))
            .await;
    }

    // No SNI at all.
    let mut no_sni = (*config).clone();
    no_sni.enable_sni = false;
    let err = exchange(ingress.addr, std::sync::Arc::new(no_sni), SNI, "x").await;
    assert!(err.is_err());
    ingress
        .assert_metric("weft_ingress_refused_total{reason=\"no_sni\"} 1")
        .await;

    // None of them reached the backend, and none was routed.
    let body = ingress.metrics().await;
    assert!(
        !body.contains("weft_ingress_connections_total{"),
        "nothing was routed: {body}"
    );
    drop(backend);
}

/// Two backends take turns; a refusing endpoint is skipped and counted.
#[tokio::test]
async fn round_robin_and_failover() {
    let pki = Pki::new();
    let b1 = Backend::start(&pki, "backend-1").await;
    let b2 = Backend::start(&pki, "backend-2").await;
    let ingress = Ingress::start(vec![service(
        "payments",
        "backend",
        vec![b1.endpoint(), b2.endpoint()],
    )])
    .await;
    let config = pki.client_config(&pki.issue(&["frontend.west.payments.weft"]));
    let mut answers = Vec::new();
    for i in 0..4 {
        let ex = exchange(ingress.addr, config.clone(), SNI, &format!("{i}"))
            .await
            .unwrap();
        answers.push(ex.answer);
    }
    let who: Vec<&str> = answers.iter().map(|a| &a[..9]).collect();
    assert_eq!(who[0], who[2], "{answers:?}");
    assert_eq!(who[1], who[3], "{answers:?}");
    assert_ne!(who[0], who[1], "{answers:?}");

    // One endpoint refuses connections: every connection still works.
    let dead = closed_port().await;
    ingress
        .routes
        .apply(&weft_proto::dataplane::v1::Update {
            nonce: 2,
            services: vec![service(
                "payments",
                "backend",
                vec![endpoint(dead, "dead"), b2.endpoint()],
            )],
            ..Default::default()
        })
        .unwrap();
    for i in 0..4 {
        let ex = exchange(ingress.addr, config.clone(), SNI, &format!("{i}"))
            .await
            .expect("failover to the live endpoint");
        assert_eq!(ex.answer, format!("backend-2: {i}"));
    }
    // Round robin starts on the dead one every other connection.
    ingress
        .assert_metric("weft_ingress_upstream_connect_failures_total 2")
        .await;

    // Every endpoint refuses: the connection is closed.
    ingress
        .routes
        .apply(&weft_proto::dataplane::v1::Update {
            nonce: 3,
            services: vec![service("payments", "backend", vec![endpoint(dead, "dead")])],
            ..Default::default()
        })
        .unwrap();
    assert!(exchange(ingress.addr, config, SNI, "x").await.is_err());
    ingress
        .assert_metric("weft_ingress_upstream_connect_failures_total 3")
        .await;
}

/// A client that sends nothing (or half a ClientHello) is closed at the deadline.
#[tokio::test]
async fn client_hello_deadline() {
    let ingress = Ingress::start_with(
        vec![],
        proxy::Timing {
            hello_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await;
    let mut s = TcpStream::connect(ingress.addr).await.unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00\x01").await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("closed by the ingress")
        .unwrap_or(0);
    assert_eq!(n, 0);
    ingress
        .assert_metric("weft_ingress_refused_total{reason=\"timeout\"} 1")
        .await;
    // A client that leaves early is counted too.
    drop(TcpStream::connect(ingress.addr).await.unwrap());
    ingress
        .assert_metric("weft_ingress_refused_total{reason=\"early_close\"} 1")
        .await;
}

/// Drain: the listener stops accepting; an open connection finishes its exchange.
#[tokio::test]
async fn drain_lets_open_connections_finish() {
    let pki = Pki::new();
    let backend = Backend::start(&pki, "backend-1").await;
    let ingress = Ingress::start(vec![service(
        "payments",
        "backend",
        vec![backend.endpoint()],
    )])
    .await;
    let config = pki.client_config(&pki.issue(&["frontend.west.payments.weft"]));
    // Open a connection and finish the handshake, but do not finish the exchange yet.
    let tcp = TcpStream::connect(ingress.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let name = rustls::pki_types::ServerName::try_from(SNI).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    ingress
        .assert_metric("weft_ingress_active_connections{mesh=\"payments\",service=\"backend\"} 1")
        .await;

    ingress.ctx.draining.cancel();
    ingress.ctx.tasks.close();
    // New connections are not accepted any more.
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect(ingress.addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !ingress.ctx.tasks.is_empty(),
        "the open connection is still tracked"
    );
    // The open one still works.
    tls.write_all(b"late").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "backend-1: late");
    tokio::time::timeout(WAIT, ingress.ctx.tasks.wait())
        .await
        .expect("the drain ends when the connection does");
}
