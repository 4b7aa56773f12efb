//! Virtual outbounds on loopback: the embedded DNS server (real UDP and TCP packets, a tiny
//! upstream resolver started by the test), VIP listeners following the VIP table (127/8
//! addresses, real HTTP and TCP), pinned names, and locality failover. The configuration is
//! fed to `State::apply` as wire updates.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use http_body_util::{BodyExt, Full};
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_dp::metrics::Metrics;
use weft_dp::state::{Context, Labels, State};
use weft_dp::tls::Identity;
use weft_dp::{dns, vips};
use weft_proto::dataplane::v1 as pb;

const WAIT: Duration = Duration::from_secs(10);
const VIEW: &str = r#"{"mesh":"default","dataplane":"web-1","inbounds":[],"outbounds":{}}"#;

// ---------------------------------------------------------------------------------------------
// Helpers

fn mk_ctx(zone: &str) -> Context {
    let labels = Labels {
        mesh: "default".into(),
        zone: zone.into(),
        dataplane: "web-1".into(),
    };
    Context {
        state: State::new(),
        identity: Identity::new("default"),
        metrics: Arc::new(Metrics::new(labels.clone())),
        labels: Arc::new(labels),
        draining: CancellationToken::new(),
        tasks: TaskTracker::new(),
    }
}

fn endpoint(addr: SocketAddr, zone: &str, weight: u32) -> pb::Endpoint {
    pb::Endpoint {
        address: addr.ip().to_string(),
        port: addr.port().into(),
        dataplane: format!("backend-{}", addr.port()),
        zone: zone.into(),
        tags: Default::default(),
        weight,
        ..Default::default()
    }
}

fn service(name: &str, protocol: &str, endpoints: Vec<pb::Endpoint>) -> pb::ServiceEndpoints {
    pb::ServiceEndpoints {
        service: name.into(),
        mesh: String::new(),
        protocol: protocol.into(),
        endpoints,
        ..Default::default()
    }
}

fn vip(name: &str, address: &str, ports: &[u16]) -> pb::Vip {
    let labels: Vec<&str> = name.split('.').collect();
    pb::Vip {
        name: name.into(),
        address: address.into(),
        service: labels[0].into(),
        zone: if labels.len() == 3 {
            labels[1].into()
        } else {
            String::new()
        },
        ports: ports.iter().map(|p| u32::from(*p)).collect(),
    }
}

fn update(services: Vec<pb::ServiceEndpoints>, vips: Option<Vec<pb::Vip>>) -> pb::Update {
    pb::Update {
        nonce: 1,
        full: true,
        view_json: Some(VIEW.into()),
        services,
        removed_services: vec![],
        vips_replace: vips.is_some(),
        vips: vips.unwrap_or_default(),
    }
}

/// An HTTP/1.1 upstream answering its name; counts requests.
async fn upstream_at(listener: TcpListener, name: &str) -> Arc<AtomicUsize> {
    let hits = Arc::new(AtomicUsize::new(0));
    let (name, h) = (name.to_string(), hits.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (name, h) = (name.clone(), h.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    h.fetch_add(1, SeqCst);
                    let body = Full::new(Bytes::from(name.clone()));
                    async move { Ok::<_, Infallible>(Response::new(body)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    hits
}

async fn upstream(name: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (addr, upstream_at(l, name).await)
}

/// A TCP upstream that answers every connection with its name, then echoes.
async fn tcp_upstream(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A loopback port nothing listens on (now).
async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `http://addr/` on a new connection: the body, or the error.
async fn get(addr: SocketAddr) -> Result<String, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", "backend.mesh")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, tx.send_request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body).to_string();
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the series `name` whose labels include `label` (e.g. `result="vip"`).
fn metric(ctx: &Context, name: &str, label: &str) -> Option<f64> {
    ctx.metrics
        .render(&ctx.identity)
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// DNS

/// A tiny upstream resolver: answers every query for `example.com` with 93.184.216.34
/// (TTL 77), over UDP; records the names asked. `silent` names get no answer.
async fn fake_resolver() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = asked.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let req = Message::from_vec(&buf[..n]).unwrap();
            let name = req.queries[0].name().to_ascii();
            a.lock().unwrap().push(name.clone());
            if name.starts_with("silent") {
                continue;
            }
            let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
            resp.metadata.recursion_available = true;
            resp.queries = req.queries.clone();
            resp.add_answer(hickory_proto::rr::Record::from_rdata(
                req.queries[0].name().clone(),
                77,
                RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(93, 184, 216, 34))),
            ));
            sock.send_to(&resp.to_vec().unwrap(), peer).await.unwrap();
        }
    });
    (addr, asked)
}

struct Dns {
    ctx: Context,
    addr: SocketAddr,
    asked: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn mk_dns() -> Dns {
    let ctx = mk_ctx("east");
    ctx.state
        .apply(&update(
            vec![],
            Some(vec![
                vip("backend.mesh", "127.77.0.1", &[80]),
                vip("backend.west.mesh", "127.77.0.2", &[80]),
            ]),
        ))
        .unwrap();
    let (upstream, asked) = fake_resolver().await;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let cfg = dns::Config {
        address: addr,
        upstream,
        ttl: Duration::from_secs(30),
        upstream_timeout: Duration::from_millis(300),
    };
    tokio::spawn(dns::run(udp, tcp, cfg, ctx.clone()));
    Dns { ctx, addr, asked }
}

fn query(id: u16, name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.to_vec().unwrap()
}

/// One query over UDP: the raw answer.
async fn ask_raw(server: SocketAddr, q: &[u8]) -> Vec<u8> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(q, server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("a DNS answer in time")
        .unwrap();
    buf.truncate(n);
    buf
}

async fn ask(server: SocketAddr, id: u16, name: &str, t: RecordType) -> Message {
    let m = Message::from_vec(&ask_raw(server, &query(id, name, t)).await).unwrap();
    assert_eq!(
        m.metadata.id, id,
        "{name}: the answer carries the query's id"
    );
    m
}

fn a_records(m: &Message) -> Vec<(Ipv4Addr, u32)> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((a.0, r.ttl)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn dns_answers_vips_nodata_and_nxdomain() {
    let d = mk_dns().await;
    let m = ask(d.addr, 1, "backend.mesh.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&m), [(Ipv4Addr::new(127, 77, 0, 1), 30)]);
    let m = ask(d.addr, 2, "backend.west.mesh.", RecordType::A).await;
    assert_eq!(a_records(&m), [(Ipv4Addr::new(127, 77, 0, 2), 30)]);
    let m = ask(d.addr, 3, "backend.mesh.", RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty(), "NODATA for AAAA");
    for name in ["payments.mesh.", "backend.east.mesh.", "x.y.z.mesh."] {
        let m = ask(d.addr, 4, name, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
    assert!(
        d.asked.lock().unwrap().is_empty(),
        ".mesh names never go upstream"
    );
    // A table change applies to the next query.
    d.ctx
        .state
        .apply(&update(
            vec![],
            Some(vec![vip("backend.mesh", "127.77.0.9", &[80])]),
        ))
        .unwrap();
    let m = ask(d.addr, 5, "backend.mesh.", RecordType::A).await;
    assert_eq!(a_records(&m), [(Ipv4Addr::new(127, 77, 0, 9), 30)]);
    let m = ask(d.addr, 6, "backend.west.mesh.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(
        metric(&d.ctx, "weft_dp_dns_queries_total", "result=\"vip\""),
        Some(3.0)
    );
    assert_eq!(
        metric(&d.ctx, "weft_dp_dns_queries_total", "result=\"nxdomain\""),
        Some(4.0)
    );
}

#[tokio::test]
async fn dns_forwards_other_names_unchanged_and_servfails_on_timeout() {
    let d = mk_dns().await;
    let q = query(0xbeef, "example.com.", RecordType::A);
    let raw = ask_raw(d.addr, &q).await;
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(m.metadata.id, 0xbeef);
    assert_eq!(
        a_records(&m),
        [(Ipv4Addr::new(93, 184, 216, 34), 77)],
        "the upstream's answer, TTL included"
    );
    assert!(!m.metadata.authoritative);
    assert_eq!(*d.asked.lock().unwrap(), ["example.com."]);
    // Several at once, each answered with its own id.
    let answers = futures::future::join_all(
        (0..5u16).map(|i| ask(d.addr, 100 + i, "example.com.", RecordType::A)),
    )
    .await;
    assert!(answers.iter().all(|m| a_records(m).len() == 1));
    // The upstream does not answer: SERVFAIL after the timeout.
    let m = ask(d.addr, 7, "silent.example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(
        metric(&d.ctx, "weft_dp_dns_queries_total", "result=\"servfail\""),
        Some(1.0)
    );
}

#[tokio::test]
async fn dns_over_tcp() {
    let d = mk_dns().await;
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    for (id, name) in [(9u16, "backend.mesh."), (10, "backend.west.mesh.")] {
        let q = query(id, name, RecordType::A);
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.metadata.id, id);
        assert_eq!(a_records(&m).len(), 1, "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// VIP listeners

#[tokio::test]
async fn vip_listeners_follow_the_table_and_pinned_names_stay_in_their_zone() {
    let ctx = mk_ctx("east");
    let (east, east_hits) = upstream("east-1").await;
    let (west, west_hits) = upstream("west-ingress").await;
    let echo = tcp_upstream("db-west").await;
    let port = free_port().await;
    let services = vec![
        service(
            "backend",
            "http",
            vec![endpoint(west, "west", 2), endpoint(east, "east", 1)],
        ),
        service("db", "tcp", vec![endpoint(echo, "west", 1)]),
    ];
    ctx.state
        .apply(&update(
            services.clone(),
            Some(vec![
                vip("backend.mesh", "127.77.1.1", &[port]),
                vip("backend.west.mesh", "127.77.1.2", &[port]),
                vip("db.mesh", "127.77.1.3", &[port]),
                // Not a local address: logged, counted, the others still work.
                vip("other.mesh", "192.0.2.1", &[port]),
            ]),
        ))
        .unwrap();
    tokio::spawn(vips::run(ctx.clone()));
    let any: SocketAddr = ([127, 77, 1, 1], port).into();
    let pinned: SocketAddr = ([127, 77, 1, 2], port).into();
    eventually("the VIP listeners are up", || async {
        get(any).await.is_ok() && get(pinned).await.is_ok()
    })
    .await;
    // backend.mesh: local first; backend.west.mesh: only west.
    for _ in 0..4 {
        assert_eq!(get(any).await.unwrap(), "east-1");
        assert_eq!(get(pinned).await.unwrap(), "west-ingress");
    }
    assert!(east_hits.load(SeqCst) >= 4 && west_hits.load(SeqCst) >= 4);
    // L4 for a tcp service.
    let mut s = TcpStream::connect(SocketAddr::from(([127, 77, 1, 3], port)))
        .await
        .unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"db-westping");
    assert_eq!(
        metric(&ctx, "weft_dp_vip_bind_failures_total", "zone=\"east\""),
        Some(1.0),
        "192.0.2.1 is not local"
    );
    assert_eq!(
        metric(&ctx, "weft_dp_vip_listeners", "zone=\"east\""),
        Some(3.0)
    );

    // The pinned name goes away, backend.mesh moves to another port: the old ones close,
    // the new one opens.
    let port2 = free_port().await;
    ctx.state
        .apply(&update(
            services.clone(),
            Some(vec![
                vip("backend.mesh", "127.77.1.1", &[port2]),
                vip("db.mesh", "127.77.1.3", &[port]),
            ]),
        ))
        .unwrap();
    eventually("the removed listeners close", || async {
        TcpStream::connect(pinned).await.is_err() && TcpStream::connect(any).await.is_err()
    })
    .await;
    let moved: SocketAddr = ([127, 77, 1, 1], port2).into();
    eventually("the new listener opens", || async {
        get(moved).await.is_ok()
    })
    .await;
    assert_eq!(get(moved).await.unwrap(), "east-1");
    assert_eq!(
        metric(&ctx, "weft_dp_vip_listeners", "zone=\"east\""),
        Some(2.0)
    );
    // The unchanged db listener kept running: the connection opened before still works.
    s.write_all(b"!").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"!");
    // A delta without vips_replace keeps the table (and the listeners).
    let mut delta = update(services, None);
    delta.full = false;
    delta.view_json = None;
    ctx.state.apply(&delta).unwrap();
    assert_eq!(get(moved).await.unwrap(), "east-1");

    // Draining stops every VIP listener.
    ctx.draining.cancel();
    eventually("draining closes the listeners", || async {
        TcpStream::connect(moved).await.is_err()
    })
    .await;
}

#[tokio::test]
async fn locality_failover_to_another_zone_and_back() {
    let ctx = mk_ctx("east");
    // The local endpoint refuses connections; west's ingress answers.
    let local_port = free_port().await;
    let local: SocketAddr = ([127, 0, 0, 1], local_port).into();
    let (west, _) = upstream("west-ingress").await;
    let port = free_port().await;
    ctx.state
        .apply(&update(
            vec![service(
                "backend",
                "http",
                vec![endpoint(local, "east", 1), endpoint(west, "west", 3)],
            )],
            Some(vec![vip("backend.mesh", "127.77.2.1", &[port])]),
        ))
        .unwrap();
    tokio::spawn(vips::run(ctx.clone()));
    let addr: SocketAddr = ([127, 77, 2, 1], port).into();
    eventually("the VIP listener is up", || async {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
    // Refused locally: the same request is retried on the other zone, and the local
    // endpoint is ejected, so the next ones go straight there.
    for _ in 0..3 {
        assert_eq!(get(addr).await.unwrap(), "west-ingress");
    }
    // The local instance comes back: once its ejection ends, traffic returns to it.
    let listener = TcpListener::bind(local).await.unwrap();
    upstream_at(listener, "east-1").await;
    eventually("traffic returns to the local zone", || async {
        get(addr).await.as_deref() == Ok("east-1")
    })
    .await;
    for _ in 0..3 {
        assert_eq!(get(addr).await.unwrap(), "east-1");
    }
}
