//! The whole ingress (`weft_ingress::serve`) against an in-process `DataplaneDiscovery` server
//! over real TLS: what it says in `Hello`, `/ready` only once registered with a first table,
//! traffic routed by the zone's table, ACK/NACK, routing on the last table while the zone is
//! away and the reconnect, a refused first session, the drain. The real zone is covered by the
//! end-to-end tests.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use weft_ingress::Shutdown;
use weft_ingress::config::{Config, LogFormat};
use weft_proto::dataplane::v1 as pb;
use weft_proto::dataplane::v1::dataplane_discovery_server::{
    DataplaneDiscovery, DataplaneDiscoveryServer,
};
use weft_proto::dataplane::v1::proxy_message::Msg as ProxyMsg;
use weft_proto::dataplane::v1::zone_message::Msg as ZoneMsg;

/// One stream the ingress opened.
struct Session {
    hello: pb::Hello,
    incoming: Streaming<pb::ProxyMessage>,
    tx: mpsc::Sender<Result<pb::ZoneMessage, Status>>,
}

impl Session {
    async fn send(&self, msg: ZoneMsg) {
        self.tx
            .send(Ok(pb::ZoneMessage { msg: Some(msg) }))
            .await
            .expect("the stream is open");
    }

    async fn recv(&mut self) -> ProxyMsg {
        tokio::time::timeout(WAIT, self.incoming.message())
            .await
            .expect("the ingress answers in time")
            .expect("the stream works")
            .expect("the stream is open")
            .msg
            .expect("a message")
    }

    async fn register(&self) {
        self.send(ZoneMsg::Registered(pb::Registered {
            zone: "east".into(),
            name: "ingress-1".into(),
            ..Default::default()
        }))
        .await;
    }

    async fn update(&mut self, u: pb::Update) -> ProxyMsg {
        self.send(ZoneMsg::Update(u)).await;
        self.recv().await
    }
}

struct Mock {
    sessions: mpsc::UnboundedSender<Session>,
    refuse: Arc<Mutex<Option<Status>>>,
}

#[tonic::async_trait]
impl DataplaneDiscovery for Mock {
    type StreamStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ZoneMessage, Status>>;

    async fn stream(
        &self,
        req: Request<Streaming<pb::ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut incoming = req.into_inner();
        let hello = match incoming.message().await?.and_then(|m| m.msg) {
            Some(ProxyMsg::Hello(h)) => h,
            other => return Err(Status::invalid_argument(format!("{other:?} before Hello"))),
        };
        if let Some(status) = self.refuse.lock().unwrap().clone() {
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(16);
        let _ = self.sessions.send(Session {
            hello,
            incoming,
            tx,
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

struct Zone {
    addr: SocketAddr,
    ca_pem: String,
    sessions: mpsc::UnboundedReceiver<Session>,
    refuse: Arc<Mutex<Option<Status>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Zone {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Zone {
    async fn start() -> Zone {
        let pki = Pki::new();
        let (cert_pem, key_pem) = pki.issue_pem(&["localhost", "127.0.0.1"]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sessions_tx, sessions) = mpsc::unbounded_channel();
        let refuse = Arc::new(Mutex::new(None));
        let mock = Mock {
            sessions: sessions_tx,
            refuse: refuse.clone(),
        };
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
        let server = tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(DataplaneDiscoveryServer::new(mock))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(async move {
            server.await.expect("the test zone serves");
        });
        Zone {
            addr,
            ca_pem: pki.ca_pem(),
            sessions,
            refuse,
            server,
        }
    }

    async fn session(&mut self) -> Session {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("the ingress connects in time")
            .expect("the zone runs")
    }
}

struct Running {
    traffic: SocketAddr,
    admin: SocketAddr,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start_ingress(zone: &Zone) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "zone-token-for-ingress\n").unwrap();
    let traffic = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (traffic_addr, admin_addr) = (traffic.local_addr().unwrap(), admin.local_addr().unwrap());
    let cfg = Config {
        mode: weft_ingress::config::Mode::Ingress,
        external_ca_pem: None,
        zone_address: format!("https://127.0.0.1:{}", zone.addr.port()),
        zone_ca_pem: zone.ca_pem.clone(),
        token_file,
        name: "ingress-1".into(),
        resource: weft_ingress::config::resource("ingress-1", traffic_addr, None, None).unwrap(),
        address: traffic_addr,
        admin_address: admin_addr,
        threads: 1,
        drain_timeout: Duration::from_secs(5),
        log_level: "info".into(),
        log_format: LogFormat::Text,
    };
    let shutdown = Shutdown::default();
    let task = tokio::spawn(weft_ingress::serve(cfg, traffic, admin, shutdown.clone()));
    Running {
        traffic: traffic_addr,
        admin: admin_addr,
        shutdown,
        task,
        _dir: dir,
    }
}

/// Wait until `/ready` answers `want` with a body containing `says`.
async fn wait_ready(admin: SocketAddr, want: u16, says: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = http_get(admin, "/ready").await;
        if status == want && body.contains(says) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready is {status} ({body}), expected {want} ({says})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn registers_routes_acks_and_survives_the_zone_going_away() {
    let pki = Pki::new();
    let backend = Backend::start(&pki, "backend-1").await;
    let config = pki.client_config(&pki.issue(&["frontend.west.payments.weft"]));
    let mut zone = Zone::start().await;
    let ingress = start_ingress(&zone).await;

    let mut s = zone.session().await;
    assert_eq!(s.hello.token, "zone-token-for-ingress");
    assert!(!s.hello.has_config);
    assert!(!s.hello.virtual_outbounds);
    let r = weft_core::document::parse(&s.hello.dataplane)
        .unwrap()
        .remove(0);
    assert_eq!(r.kind, weft_core::kind::Kind::ZoneIngress);
    assert_eq!(r.name, "ingress-1");
    assert_eq!(r.spec["networking"]["port"], ingress.traffic.port());

    wait_ready(ingress.admin, 503, "not registered with the zone yet").await;
    s.register().await;
    wait_ready(ingress.admin, 503, "no routing table from the zone yet").await;
    let full = pb::Update {
        nonce: 1,
        full: true,
        services: vec![service("payments", "backend", vec![backend.endpoint()])],
        ..Default::default()
    };
    assert_eq!(s.update(full).await, ProxyMsg::Ack(pb::Ack { nonce: 1 }));
    wait_ready(ingress.admin, 200, "ready").await;

    let ex = exchange(ingress.traffic, config.clone(), SNI, "hi")
        .await
        .unwrap();
    assert_eq!(ex.answer, "backend-1: hi");

    // A bad update: NACKed with the reason; the table stays.
    let bad = pb::Update {
        nonce: 2,
        services: vec![service("", "backend", vec![])],
        ..Default::default()
    };
    match s.update(bad).await {
        ProxyMsg::Nack(n) => {
            assert_eq!(n.nonce, 2);
            assert!(n.reason.contains("services[0].mesh"), "{}", n.reason);
        }
        other => panic!("a NACK expected, got {other:?}"),
    }
    let (_, cfg) = http_get(ingress.admin, "/config").await;
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["zone"], "east");
    assert_eq!(cfg["nacks"], 1);
    assert_eq!(cfg["services"][0]["service"], "backend");
    let (_, metrics) = http_get(ingress.admin, "/metrics").await;
    assert!(
        metrics.contains("weft_ingress_updates_total{result=\"nack\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_ingress_zone_connected 1"),
        "{metrics}"
    );

    // The zone goes away: traffic keeps flowing on the last table; the ingress comes back
    // saying it has a table.
    drop(s);
    let ex = exchange(ingress.traffic, config.clone(), SNI, "alone")
        .await
        .unwrap();
    assert_eq!(ex.answer, "backend-1: alone");
    let mut s = zone.session().await;
    assert!(s.hello.has_config, "the reconnect says it has a table");
    s.register().await;
    let removal = pb::Update {
        nonce: 1,
        full: true,
        ..Default::default()
    };
    assert_eq!(s.update(removal).await, ProxyMsg::Ack(pb::Ack { nonce: 1 }));
    assert!(exchange(ingress.traffic, config, SNI, "x").await.is_err());

    ingress.shutdown.drain.cancel();
    tokio::time::timeout(WAIT, ingress.task)
        .await
        .expect("the drain ends")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_refused_first_session_stops_the_ingress() {
    let zone = Zone::start().await;
    *zone.refuse.lock().unwrap() = Some(Status::unauthenticated("zone token: bad signature"));
    let ingress = start_ingress(&zone).await;
    let err = tokio::time::timeout(WAIT, ingress.task)
        .await
        .expect("the ingress stops")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("refused this ingress"), "{err}");
    assert!(err.contains("bad signature"), "{err}");
    assert!(err.contains("--token-file"), "{err}");
}

/// SIGTERM's drain (as `main` drives it): `/ready` says draining, new connections are not
/// accepted, an open connection finishes, then `serve` returns.
#[tokio::test]
async fn drain_waits_for_open_connections() {
    let pki = Pki::new();
    let backend = Backend::start(&pki, "backend-1").await;
    let config = pki.client_config(&pki.issue(&["frontend.west.payments.weft"]));
    let mut zone = Zone::start().await;
    let ingress = start_ingress(&zone).await;
    let mut s = zone.session().await;
    s.register().await;
    let full = pb::Update {
        nonce: 1,
        full: true,
        services: vec![service("payments", "backend", vec![backend.endpoint()])],
        ..Default::default()
    };
    assert_eq!(s.update(full).await, ProxyMsg::Ack(pb::Ack { nonce: 1 }));
    wait_ready(ingress.admin, 200, "ready").await;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(ingress.traffic)
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls::pki_types::ServerName::try_from(SNI).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();

    ingress.shutdown.drain.cancel();
    wait_ready(ingress.admin, 503, "draining").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(ingress.traffic)
        .await
        .is_ok()
    {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!ingress.task.is_finished(), "waits for the open connection");
    tls.write_all(b"last words").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "backend-1: last words");
    tokio::time::timeout(WAIT, ingress.task)
        .await
        .expect("serve returns once the connection is done")
        .unwrap()
        .unwrap();
}
