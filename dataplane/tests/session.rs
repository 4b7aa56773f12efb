//! The zone session (`weft_dp::client`) against an in-process `DataplaneDiscovery` server over
//! real TLS: what the proxy says, how it answers updates, its certificate cycle, reconnects and
//! refusals. The real zone is covered by the end-to-end tests. Also: the binary refuses a bad
//! Dataplane file before starting anything.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use weft_core::pki::{self, IntermediateCa, RootCa};
use weft_dp::client::{self, Client, Timing};
use weft_dp::state::State;
use weft_dp::tls::Identity;
use weft_proto::dataplane::v1 as pb;
use weft_proto::dataplane::v1::dataplane_discovery_server::{
    DataplaneDiscovery, DataplaneDiscoveryServer,
};
use weft_proto::dataplane::v1::proxy_message::Msg as ProxyMsg;
use weft_proto::dataplane::v1::zone_message::Msg as ZoneMsg;

const WAIT: Duration = Duration::from_secs(10);

const DATAPLANE: &str = "type: Dataplane
name: web-1
mesh: default
spec:
  networking:
    address: 127.0.0.1
    inbound:
      - port: 18080
        tags: {weft.io/service: web}
";

const VIEW: &str = r#"{"mesh":"default","dataplane":"web-1","inbounds":[],"outbounds":{}}"#;

// ---------------------------------------------------------------------------------------------
// The test zone

/// One stream the proxy opened: its Hello, what it sends next, and the way to answer.
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
            .expect("the proxy answers in time")
            .expect("the stream works")
            .expect("the stream is open")
            .msg
            .expect("a message")
    }

    async fn register(&self, mtls: bool) {
        self.send(ZoneMsg::Registered(pb::Registered {
            zone: "east".into(),
            mesh: "default".into(),
            name: "web-1".into(),
            mtls,
        }))
        .await;
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
    /// A zone on 127.0.0.1 with a server certificate from its own CA.
    async fn start() -> Zone {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test zone dataplane CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.signed_by(&key, &*ca).unwrap();
        let ca_pem = ca.as_ref().pem();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sessions_tx, sessions) = mpsc::unbounded_channel();
        let refuse = Arc::new(Mutex::new(None));
        let mock = Mock {
            sessions: sessions_tx,
            refuse: refuse.clone(),
        };
        let tls = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem()),
        );
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
            ca_pem,
            sessions,
            refuse,
            server,
        }
    }

    async fn session(&mut self) -> Session {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("the proxy connects in time")
            .expect("the zone runs")
    }

    fn refuse(&self, status: Option<Status>) {
        *self.refuse.lock().unwrap() = status;
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy side

struct Proxy {
    state: State,
    identity: Arc<Identity>,
    status: Arc<client::Status>,
    shutdown: CancellationToken,
    run: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn mk_proxy(zone: &Zone) -> Proxy {
    mk_proxy_with(zone, false)
}

/// A proxy that asks for virtual outbounds (as with --dns-address or --bind-vips) or not.
fn mk_proxy_with(zone: &Zone, virtual_outbounds: bool) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "dp-token-123\n").unwrap();
    let cfg = client::Config {
        address: format!("https://127.0.0.1:{}", zone.addr.port()),
        ca_pem: zone.ca_pem.clone(),
        token_file,
        dataplane: DATAPLANE.into(),
        name: "web-1".into(),
        mesh: "default".into(),
        service: "web".into(),
        virtual_outbounds,
        timing: Timing {
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
            cert_retry: Duration::from_millis(200),
            cert_retry_max: Duration::from_secs(1),
            ..Timing::default()
        },
    };
    let state = State::new();
    let identity = Identity::new("default");
    let client = Client::new(cfg, state.clone(), identity.clone());
    let status = client.status();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(client.run(shutdown.clone()));
    Proxy {
        state,
        identity,
        status,
        shutdown,
        run,
        _dir: dir,
    }
}

fn endpoints(service: &str, ports: &[u32]) -> pb::ServiceEndpoints {
    pb::ServiceEndpoints {
        service: service.into(),
        mesh: String::new(),
        protocol: "http".into(),
        endpoints: ports
            .iter()
            .map(|p| pb::Endpoint {
                address: "10.0.0.1".into(),
                port: *p,
                dataplane: format!("backend-{p}"),
                zone: "east".into(),
                tags: Default::default(),
                weight: 1,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn full_update(nonce: u64) -> ZoneMsg {
    ZoneMsg::Update(pb::Update {
        nonce,
        full: true,
        view_json: Some(VIEW.into()),
        services: vec![endpoints("backend", &[8080, 8081])],
        removed_services: vec![],
        vips_replace: false,
        vips: vec![],
    })
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The DER of the public key a CSR is for.
fn csr_key(csr_pem: &str) -> Vec<u8> {
    use x509_parser::prelude::FromDer as _;
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).unwrap();
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .unwrap();
    csr.certification_request_info.subject_pki.raw.to_vec()
}

/// The mesh's root and a zone intermediate, as global and the zone would have them.
fn mk_mesh_ca() -> (RootCa, IntermediateCa) {
    let day = Duration::from_secs(86_400);
    let root = RootCa::generate("default", day).unwrap();
    let key = pki::new_key().unwrap();
    let csr = pki::intermediate_csr("default", "east", &key).unwrap();
    let cert = root.sign_intermediate(&csr, "east", day).unwrap();
    let ca = IntermediateCa::from_pem(&cert, &key, root.cert_pem()).unwrap();
    (root, ca)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn hello_then_ack_for_a_good_update_and_nack_for_a_bad_one() {
    let mut zone = Zone::start().await;
    let proxy = mk_proxy(&zone);
    let mut s = zone.session().await;
    assert_eq!(s.hello.token, "dp-token-123", "the token, trimmed");
    assert_eq!(s.hello.dataplane, DATAPLANE, "the file's text as is");
    assert_eq!(s.hello.version, env!("CARGO_PKG_VERSION"));
    assert!(!s.hello.has_config);
    assert!(
        !s.hello.virtual_outbounds,
        "no --dns-address nor --bind-vips"
    );

    s.register(false).await;
    s.send(full_update(1)).await;
    assert_eq!(s.recv().await, ProxyMsg::Ack(pb::Ack { nonce: 1 }));
    let snapshot = proxy.state.current();
    assert_eq!((snapshot.generation, snapshot.nonce), (1, 1));
    assert_eq!(proxy.state.service("backend").unwrap().endpoints.len(), 2);
    assert!(proxy.status.connected());
    assert_eq!(proxy.status.zone(), "east");
    assert_eq!(
        proxy.status.progress().waiting_for(),
        None,
        "no mTLS: ready"
    );

    // A port out of range: refused, nothing changes.
    s.send(ZoneMsg::Update(pb::Update {
        nonce: 2,
        full: false,
        view_json: None,
        services: vec![endpoints("backend", &[70000])],
        removed_services: vec!["backend".into()],
        vips_replace: false,
        vips: vec![],
    }))
    .await;
    let ProxyMsg::Nack(nack) = s.recv().await else {
        panic!("a Nack expected")
    };
    assert_eq!(nack.nonce, 2);
    assert!(
        nack.reason.contains("services[backend].endpoints[0].port"),
        "{}",
        nack.reason
    );
    let after = proxy.state.current();
    assert_eq!((after.generation, after.nonce), (1, 1));
    assert_eq!(
        proxy.state.service("backend").unwrap().endpoints[0].port,
        8080
    );
    let c = proxy.status.counters();
    assert_eq!((c.acks, c.nacks), (1, 1));
}

#[tokio::test]
async fn a_dropped_stream_reconnects_with_has_config_and_keeps_the_config() {
    let mut zone = Zone::start().await;
    let proxy = mk_proxy(&zone);
    let mut s = zone.session().await;
    s.register(false).await;
    s.send(full_update(1)).await;
    assert_eq!(s.recv().await, ProxyMsg::Ack(pb::Ack { nonce: 1 }));

    drop(s);
    eventually("the proxy to notice", || !proxy.status.connected()).await;
    let mut s = zone.session().await;
    assert!(s.hello.has_config, "the proxy says it runs on a config");
    assert!(proxy.status.counters().reconnects >= 1);
    // While the zone is away and after it is back, the old config stays.
    assert_eq!(proxy.state.current().generation, 1);
    assert_eq!(proxy.state.service("backend").unwrap().endpoints.len(), 2);
    s.register(false).await;
    eventually("connected again", || proxy.status.connected()).await;
    s.send(full_update(7)).await;
    assert_eq!(s.recv().await, ProxyMsg::Ack(pb::Ack { nonce: 7 }));
    assert_eq!(proxy.state.current().generation, 2);
}

#[tokio::test]
async fn certificate_installed_then_renewed_at_70_percent_of_what_is_left_with_a_fresh_key() {
    let (root, ca) = mk_mesh_ca();
    let mut zone = Zone::start().await;
    let proxy = mk_proxy(&zone);
    let mut s = zone.session().await;
    s.register(true).await;
    s.send(full_update(1)).await;
    // The CSR comes right after Registered, the Ack after the Update.
    let mut csr1 = None;
    for _ in 0..2 {
        match s.recv().await {
            ProxyMsg::CertificateRequest(r) => csr1 = Some(r.csr_pem),
            ProxyMsg::Ack(a) => assert_eq!(a.nonce, 1),
            other => panic!("unexpected {other:?}"),
        }
    }
    let csr1 = csr1.expect("a certificate request after Registered");
    assert!(
        proxy
            .status
            .progress()
            .waiting_for()
            .unwrap()
            .contains("certificate"),
        "not ready without a certificate when the mesh has mTLS"
    );

    let sent = SystemTime::now();
    let cert = ca
        .issue_workload(&csr1, "default", "web", Duration::from_secs(3), sent)
        .unwrap();
    let sent_at = Instant::now();
    s.send(ZoneMsg::Certificate(pb::Certificate {
        chain_pem: cert.chain_pem.clone(),
        roots_pem: vec![root.cert_pem().to_string()],
        not_after_unix: cert.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64,
        ..Default::default()
    }))
    .await;
    let ProxyMsg::CertificateRequest(renewal) = s.recv().await else {
        panic!("a renewal request expected")
    };
    let waited = sent_at.elapsed();
    let installed = proxy
        .identity
        .status()
        .expect("the certificate is installed");
    assert_eq!(installed.id.to_string(), "spiffe://default/web");
    assert_eq!(installed.not_after, cert.not_after);
    assert_eq!(proxy.status.progress().waiting_for(), None);
    // 70% of what was left at receipt (not of the back-dated lifetime: that would be now).
    let expected = cert.not_after.duration_since(sent).unwrap() * 7 / 10;
    assert!(
        waited + Duration::from_millis(300) >= expected
            && waited <= expected + Duration::from_millis(700),
        "renewal after {waited:?}, expected about {expected:?}"
    );
    assert_ne!(
        csr_key(&renewal.csr_pem),
        csr_key(&csr1),
        "each renewal uses a fresh key"
    );

    // The zone cannot issue: the proxy keeps its certificate and asks again soon.
    s.send(ZoneMsg::CertificateError(pb::CertificateError {
        reason: "no intermediate CA for mesh default yet".into(),
        ..Default::default()
    }))
    .await;
    let asked = Instant::now();
    let ProxyMsg::CertificateRequest(_) = s.recv().await else {
        panic!("a retry expected")
    };
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "retried after {:?}",
        asked.elapsed()
    );
    assert_eq!(proxy.identity.status().unwrap().serial, installed.serial);

    // A chain that does not install: kept the old one, asked again.
    s.send(ZoneMsg::Certificate(pb::Certificate {
        chain_pem: "not a certificate".into(),
        roots_pem: vec![root.cert_pem().to_string()],
        not_after_unix: 0,
        ..Default::default()
    }))
    .await;
    let ProxyMsg::CertificateRequest(_) = s.recv().await else {
        panic!("a retry expected")
    };
    assert_eq!(proxy.identity.status().unwrap().serial, installed.serial);
    let c = proxy.status.counters();
    assert_eq!(
        (c.certs_installed, c.certs_refused, c.certs_invalid),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn a_refused_first_session_ends_the_run_with_the_zones_message() {
    let mut zone = Zone::start().await;
    zone.refuse(Some(Status::unauthenticated(
        "dataplane token: expired at 2026-01-01T00:00:00Z",
    )));
    let mut proxy = mk_proxy(&zone);
    let result = tokio::time::timeout(WAIT, &mut proxy.run)
        .await
        .expect("the run ends at once")
        .unwrap();
    let err = format!("{:#}", result.expect_err("a refusal is fatal"));
    assert!(err.contains("dataplane token: expired"), "{err}");
    assert!(err.contains("Unauthenticated"), "{err}");
    assert!(zone.sessions.try_recv().is_err(), "no session was accepted");
}

#[tokio::test]
async fn a_refusal_after_a_session_was_established_is_retried() {
    let mut zone = Zone::start().await;
    let proxy = mk_proxy(&zone);
    let s = zone.session().await;
    s.register(false).await;
    eventually("registered", || proxy.status.connected()).await;
    zone.refuse(Some(Status::permission_denied("token revoked")));
    drop(s);
    eventually("a few refused attempts", || {
        proxy.status.counters().reconnects >= 3
    })
    .await;
    assert!(!proxy.run.is_finished(), "the proxy keeps trying");
    zone.refuse(None);
    let s = zone.session().await;
    assert!(!s.hello.has_config, "no config was ever applied");
}

#[test]
fn the_binary_refuses_a_bad_dataplane_file() {
    let dir = tempfile::tempdir().unwrap();
    let dp = dir.path().join("dp.yaml");
    std::fs::write(&dp, DATAPLANE.replace("weft.io/service: web", "app: web")).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft-dp"))
        .args([
            "run",
            "--zone-address",
            "https://127.0.0.1:1",
            "--zone-ca-file",
        ])
        .arg(&ca)
        .arg("--dataplane-file")
        .arg(&dp)
        .arg("--token-file")
        .arg(&token)
        // Nothing may start: not even the admin endpoint.
        .args(["--admin-address", "127.0.0.1:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("spec.networking.inbound[0].tags"),
        "{stderr}"
    );
    assert!(stderr.contains("dp.yaml"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft-dp"))
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("weft-dp {}", env!("CARGO_PKG_VERSION"))
    );
}

// ---------------------------------------------------------------------------------------------
// The binary against the test zone

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on the admin endpoint: status and body, `None` while it does not answer.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let status = buf.split(' ').nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// weft-dp running as a process against `zone`, its stderr in a file.
struct Binary {
    child: std::process::Child,
    admin: SocketAddr,
    stderr: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    fn start(zone: &Zone, inbound_port: u16) -> Binary {
        Binary::start_with(
            zone,
            &DATAPLANE.replace("port: 18080", &format!("port: {inbound_port}")),
        )
    }

    fn start_with(zone: &Zone, dataplane: &str) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let dp = dir.path().join("dp.yaml");
        std::fs::write(&dp, dataplane).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "dp-token-123").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &zone.ca_pem).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let stderr = dir.path().join("stderr");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_weft-dp"))
            .arg("run")
            .arg("--zone-address")
            .arg(format!("https://127.0.0.1:{}", zone.addr.port()))
            .arg("--zone-ca-file")
            .arg(&ca)
            .arg("--dataplane-file")
            .arg(&dp)
            .arg("--token-file")
            .arg(&token)
            .arg("--admin-address")
            .arg(admin.to_string())
            .args(["--drain-timeout", "2s", "--log-level", "debug"])
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Binary {
            child,
            admin,
            stderr,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    async fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "weft-dp did not exit: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_binary_serves_admin_then_drains_on_sigterm() {
    let mut zone = Zone::start().await;
    let mut dp = Binary::start(&zone, free_port());
    let mut s = zone.session().await;
    assert_eq!(s.hello.token, "dp-token-123");
    // Admin is up before any configuration, and says what is missing.
    let deadline = Instant::now() + WAIT;
    let (status, body) = loop {
        if let Some(r) = get(dp.admin, "/ready").await {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no admin endpoint: {}",
            dp.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (status, body.trim()),
        (503, "not registered with the zone yet")
    );

    s.register(false).await;
    s.send(full_update(1)).await;
    assert_eq!(s.recv().await, ProxyMsg::Ack(pb::Ack { nonce: 1 }));
    let deadline = Instant::now() + WAIT;
    while get(dp.admin, "/ready").await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "never ready: {}", dp.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get(dp.admin, "/config").await.unwrap();
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["zone"], "east");
    assert_eq!(config["connected"], true);
    assert_eq!(config["generation"], 1);
    assert_eq!(config["view"]["dataplane"], "web-1");
    assert_eq!(config["services"]["backend"]["endpoints"][1]["port"], 8081);
    assert_eq!(config["certificate"], serde_json::Value::Null);
    let (status, metrics) = get(dp.admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            "weft_dp_updates_total{mesh=\"default\",zone=\"east\",dataplane=\"web-1\",result=\"ack\"} 1"
        ),
        "{metrics}"
    );
    assert_eq!(get(dp.admin, "/nope").await.unwrap().0, 404);

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &dp.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(dp.exit_code().await, Some(0), "{}", dp.stderr());
    assert!(dp.stderr().contains("drained"), "{}", dp.stderr());
}

#[tokio::test]
async fn the_binary_exits_1_when_an_inbound_cannot_bind() {
    let mut zone = Zone::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut dp = Binary::start(&zone, port);
    let mut s = zone.session().await;
    s.register(false).await;
    s.send(full_update(1)).await;
    assert_eq!(s.recv().await, ProxyMsg::Ack(pb::Ack { nonce: 1 }));
    assert_eq!(dp.exit_code().await, Some(1), "{}", dp.stderr());
    assert!(
        dp.stderr()
            .contains(&format!("networking.inbound[0]: binding 127.0.0.1:{port}")),
        "{}",
        dp.stderr()
    );
}

#[tokio::test]
async fn sigterm_waits_for_open_connections_up_to_the_drain_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // The application: accepts and holds every connection, echoing what it reads.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 || c.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut zone = Zone::start().await;
    let inbound_port = free_port();
    let mut dp = Binary::start_with(
        &zone,
        &DATAPLANE.replace(
            "port: 18080",
            &format!("port: {inbound_port}\n        servicePort: {app_port}"),
        ),
    );
    let mut s = zone.session().await;
    s.register(false).await;
    s.send(full_update(1)).await;
    assert_eq!(s.recv().await, ProxyMsg::Ack(pb::Ack { nonce: 1 }));
    let deadline = Instant::now() + WAIT;
    while get(dp.admin, "/ready").await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "never ready: {}", dp.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A connection through the inbound, open when the signal comes.
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", inbound_port))
        .await
        .unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, c.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&buf, b"ping");

    let signalled = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &dp.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(dp.exit_code().await, Some(0), "{}", dp.stderr());
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "exited after {took:?}, before the drain timeout (2s), with a connection open: {}",
        dp.stderr()
    );
    assert!(dp.stderr().contains("cut=1"), "{}", dp.stderr());
}

#[tokio::test]
async fn with_mtls_the_binary_serves_once_the_certificate_is_installed() {
    let (root, ca) = mk_mesh_ca();
    let mut zone = Zone::start().await;
    let dp = Binary::start(&zone, free_port());
    let mut s = zone.session().await;
    s.register(true).await;
    s.send(full_update(1)).await;
    let mut csr = None;
    for _ in 0..2 {
        match s.recv().await {
            ProxyMsg::CertificateRequest(r) => csr = Some(r.csr_pem),
            ProxyMsg::Ack(a) => assert_eq!(a.nonce, 1),
            other => panic!("unexpected {other:?}"),
        }
    }
    let deadline = Instant::now() + WAIT;
    let (status, body) = loop {
        if let Some(r) = get(dp.admin, "/ready").await {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no admin endpoint: {}",
            dp.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (status, body.trim()),
        (503, "no workload certificate yet (the mesh has mTLS)")
    );

    let cert = ca
        .issue_workload(
            &csr.unwrap(),
            "default",
            "web",
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
    s.send(ZoneMsg::Certificate(pb::Certificate {
        chain_pem: cert.chain_pem,
        roots_pem: vec![root.cert_pem().to_string()],
        not_after_unix: cert.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64,
        ..Default::default()
    }))
    .await;
    while get(dp.admin, "/ready").await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "never ready: {}", dp.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, body) = get(dp.admin, "/config").await.unwrap();
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["certificate"]["spiffeId"], "spiffe://default/web");
    let not_after =
        chrono::DateTime::parse_from_rfc3339(config["certificate"]["notAfter"].as_str().unwrap())
            .unwrap();
    assert_eq!(
        not_after.timestamp(),
        cert.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    );
    let (_, metrics) = get(dp.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains(
            "weft_dp_certificates_total{mesh=\"default\",zone=\"east\",dataplane=\"web-1\",result=\"installed\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn virtual_outbounds_ask_for_the_vip_table_and_a_bad_one_is_refused() {
    let mut zone = Zone::start().await;
    let proxy = mk_proxy_with(&zone, true);
    let mut s = zone.session().await;
    assert!(s.hello.virtual_outbounds);
    s.register(false).await;
    let ZoneMsg::Update(mut u) = full_update(1) else {
        panic!("an update")
    };
    u.vips_replace = true;
    u.vips = vec![pb::Vip {
        name: "backend.west.mesh".into(),
        address: "240.0.0.7".into(),
        service: "backend".into(),
        zone: "west".into(),
        ports: vec![8080],
    }];
    s.send(ZoneMsg::Update(u.clone())).await;
    assert_eq!(s.recv().await, ProxyMsg::Ack(pb::Ack { nonce: 1 }));
    assert_eq!(proxy.state.current().vips.len(), 1);
    // A bad address: NACK naming the field, the table stays.
    u.nonce = 2;
    u.vips[0].address = "240.0.0.700".into();
    s.send(ZoneMsg::Update(u)).await;
    let ProxyMsg::Nack(nack) = s.recv().await else {
        panic!("a Nack expected")
    };
    assert!(nack.reason.contains("vips[0].address"), "{}", nack.reason);
    let vips = proxy.state.current().vips.clone();
    let vip = vips.values().next().unwrap();
    assert_eq!(vip.address.to_string(), "240.0.0.7");
}
