//! The outbound listener (`weft_dp::outbound`) on loopback: in-process hyper (and TCP echo)
//! upstreams, a real HTTP client on the application side, the configuration changed with
//! wire updates through `State::apply`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_core::pki::{self, IntermediateCa, RootCa};
use weft_dp::metrics::Metrics;
use weft_dp::outbound::{self, Balancer, Outbound};
use weft_dp::state::{Context, Labels, State};
use weft_dp::tls::Identity;
use weft_proto::dataplane::v1 as pb;

const WAIT: Duration = Duration::from_secs(10);
const MESH: &str = "default";

// ---------------------------------------------------------------------------------------------
// Upstreams

type UpBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// An HTTP upstream (HTTP/1.1 and HTTP/2 prior knowledge, or TLS with ALPN) that answers
/// with its name and echoes what it received in `x-*` headers; `/slow` waits for `release`.
struct Upstream {
    name: String,
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// The SNI of every TLS connection accepted.
    snis: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    async fn start(name: &str) -> Upstream {
        Upstream::start_with(name, None).await
    }

    /// Over TLS with `identity`'s server configuration (mTLS).
    async fn start_tls(name: &str, identity: Arc<Identity>) -> Upstream {
        Upstream::start_with(name, Some(identity)).await
    }

    async fn start_with(name: &str, identity: Option<Arc<Identity>>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Upstream {
            name: name.to_string(),
            addr: listener.local_addr().unwrap(),
            hits: Arc::default(),
            open: Arc::default(),
            release: Arc::new(Semaphore::new(0)),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            snis: Arc::default(),
        };
        let snis = up.snis.clone();
        let (name, hits, open, release, stop, tasks) = (
            up.name.clone(),
            up.hits.clone(),
            up.open.clone(),
            up.release.clone(),
            up.stop.clone(),
            up.tasks.clone(),
        );
        let tls = identity.map(|id| {
            tokio_rustls::TlsAcceptor::from(
                id.server_config(vec![b"h2".to_vec(), b"http/1.1".to_vec()]),
            )
        });
        up.tasks.spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                let (name, hits, open, release, stop, tls, snis) = (
                    name.clone(),
                    hits.clone(),
                    open.clone(),
                    release.clone(),
                    stop.clone(),
                    tls.clone(),
                    snis.clone(),
                );
                tasks.spawn(async move {
                    open.fetch_add(1, SeqCst);
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, name.clone(), hits.clone(), release.clone())
                    });
                    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let conn = server.serve_connection(TokioIo::new(tcp), service);
                            tokio::select! {
                                _ = stop.cancelled() => {}
                                _ = conn => {}
                            }
                        }
                        Some(tls) => {
                            if let Ok(tls) = tls.accept(tcp).await {
                                let sni = tls.get_ref().1.server_name().unwrap_or("").to_string();
                                snis.lock().unwrap().push(sni);
                                let conn = server.serve_connection(TokioIo::new(tls), service);
                                tokio::select! {
                                    _ = stop.cancelled() => {}
                                    _ = conn => {}
                                }
                            }
                        }
                    }
                    open.fetch_sub(1, SeqCst);
                });
            }
        });
        up
    }

    /// Stop listening and close every connection, as a crashed process would.
    async fn kill(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn hits(&self) -> usize {
        self.hits.load(SeqCst)
    }
}

async fn handle(
    req: Request<Incoming>,
    name: String,
    hits: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
) -> Result<Response<UpBody>, Infallible> {
    hits.fetch_add(1, SeqCst);
    if req.uri().path() == "/slow" {
        release.acquire().await.unwrap().forget();
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let mut resp = Response::builder()
        .header("x-upstream", &name)
        .header("x-method", req.method().as_str())
        .header("x-path", req.uri().path_and_query().unwrap().as_str())
        .header("x-host", host)
        .header("x-version", format!("{:?}", req.version()));
    if let Some(v) = req.headers().get("x-test") {
        resp = resp.header("x-test", v);
    }
    let trailers = req.uri().path() == "/trailers";
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut frames = vec![Ok(Frame::data(if body.is_empty() {
        Bytes::from(name)
    } else {
        body
    }))];
    if trailers {
        let mut t = hyper::HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        frames.push(Ok(Frame::trailers(t)));
    }
    Ok(resp
        .body(StreamBody::new(futures::stream::iter(frames)))
        .unwrap())
}

/// A TCP upstream that echoes what it reads.
async fn echo() -> SocketAddr {
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

/// A loopback port nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The proxy side

fn view(mtls: bool, least_request: bool) -> String {
    let outbounds = if least_request {
        r#"{"backend":{"MeshLoadBalancingStrategy":{"loadBalancer":{"type":"LeastRequest"}}}}"#
    } else {
        r#"{"backend":{}}"#
    };
    format!(
        r#"{{"mesh":"{MESH}","dataplane":"web-1","mtls":{mtls},"inbounds":[],"outbounds":{outbounds}}}"#
    )
}

fn service(protocol: &str, endpoints: &[SocketAddr]) -> pb::ServiceEndpoints {
    pb::ServiceEndpoints {
        service: "backend".into(),
        mesh: String::new(),
        protocol: protocol.into(),
        endpoints: endpoints
            .iter()
            .map(|a| pb::Endpoint {
                address: a.ip().to_string(),
                port: a.port().into(),
                dataplane: format!("backend-{}", a.port()),
                zone: "east".into(),
                tags: Default::default(),
                weight: 1,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn full(view: String, services: Vec<pb::ServiceEndpoints>) -> pb::Update {
    pb::Update {
        nonce: 1,
        full: true,
        view_json: Some(view),
        services,
        removed_services: vec![],
        vips_replace: false,
        vips: vec![],
    }
}

struct Proxy {
    addr: SocketAddr,
    state: State,
    lb: Arc<Balancer>,
    ctx: Context,
    run: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Proxy {
    async fn start(update: pb::Update) -> Proxy {
        Proxy::start_as(update, Identity::new(MESH)).await
    }

    /// With `identity` as the proxy's own workload identity.
    async fn start_as(update: pb::Update, identity: Arc<Identity>) -> Proxy {
        let state = State::new();
        state.apply(&update).unwrap();
        let ctx = Context {
            state: state.clone(),
            identity,
            metrics: Arc::new(Metrics::new(Labels::default())),
            labels: Arc::new(Labels::default()),
            draining: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let outbound = Outbound::new("backend");
        let lb = outbound::balancer(&outbound, &ctx);
        let run = tokio::spawn(outbound::serve(listener, lb.clone(), ctx.clone()));
        Proxy {
            addr,
            state,
            lb,
            ctx,
            run,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The endpoint `authority` as the balancer sees it.
    fn endpoint(&self, addr: SocketAddr) -> weft_dp::lb::Status {
        self.lb
            .status()
            .into_iter()
            .find(|s| s.authority == addr.to_string())
            .unwrap_or_else(|| panic!("{addr} is not an endpoint"))
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

struct Answer {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: String,
    trailers: Option<hyper::HeaderMap>,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Answer {
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let status = resp.status();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Answer {
        status,
        headers,
        body: String::from_utf8(collected.to_bytes().to_vec()).unwrap(),
        trailers,
    }
}

async fn get(client: &HttpClient, url: &str) -> Answer {
    send(
        client,
        Request::get(url).body(Full::new(Bytes::new())).unwrap(),
    )
    .await
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// L7

#[tokio::test]
async fn round_robin_spreads_over_three_upstreams() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let proxy = Proxy::start(full(view(false, false), vec![service("http", &addrs)])).await;
    let client = http1();
    let mut answered_by = Vec::new();
    for _ in 0..30 {
        let a = get(&client, &proxy.url("/")).await;
        assert_eq!(a.status, StatusCode::OK);
        answered_by.push(a.body);
    }
    for u in &ups {
        assert_eq!(u.hits(), 10, "{}: {answered_by:?}", u.name);
        // One keep-alive client, sequential requests: one pooled connection each.
        assert_eq!(u.open.load(SeqCst), 1, "{}", u.name);
    }
    let metrics = proxy.ctx.metrics.render(&proxy.ctx.identity);
    let requests = metrics
        .lines()
        .find(|l| l.contains("outbound") && l.contains("backend") && l.contains("2xx"))
        .unwrap_or_else(|| panic!("no outbound 2xx series:\n{metrics}"));
    assert!(requests.ends_with(" 30"), "{requests}");
}

#[tokio::test]
async fn requests_and_responses_pass_through_unchanged() {
    let up = Upstream::start("a").await;
    let proxy = Proxy::start(full(view(false, false), vec![service("http", &[up.addr])])).await;
    let client = http1();
    let req = Request::post(proxy.url("/orders?id=7"))
        .header("host", "backend.mesh:80")
        .header("x-test", "kept")
        .header("connection", "x-hop")
        .header("x-hop", "dropped")
        .body(Full::new(Bytes::from_static(b"the body")))
        .unwrap();
    let a = send(&client, req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-method"), "POST");
    assert_eq!(a.header("x-path"), "/orders?id=7");
    assert_eq!(a.header("x-host"), "backend.mesh:80");
    assert_eq!(a.header("x-test"), "kept");
    assert_eq!(a.header("x-version"), "HTTP/1.1");
    assert_eq!(a.body, "the body");
    // A 1 MiB body streams both ways.
    let big = Bytes::from(vec![b'x'; 1 << 20]);
    let a = send(
        &client,
        Request::put(proxy.url("/big"))
            .body(Full::new(big.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(a.body.len(), big.len());
}

#[tokio::test]
async fn least_request_prefers_the_idle_upstream() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let proxy = Proxy::start(full(
        view(false, true),
        vec![service("http", &[a.addr, b.addr])],
    ))
    .await;
    let client = http1();
    let slow = tokio::spawn({
        let client = client.clone();
        let url = proxy.url("/slow");
        async move { get(&client, &url).await }
    });
    eventually("the slow request reaches an upstream", || {
        a.hits() + b.hits() == 1
    })
    .await;
    let (busy, idle) = if a.hits() == 1 { (&a, &b) } else { (&b, &a) };
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/")).await.body, idle.name);
    }
    assert_eq!((busy.hits(), idle.hits()), (1, 10));
    busy.release.add_permits(1);
    assert_eq!(slow.await.unwrap().body, busy.name);
}

#[tokio::test]
async fn a_killed_upstream_costs_no_request_and_is_ejected() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let proxy = Proxy::start(full(view(false, false), vec![service("http", &addrs)])).await;
    let client = http1();
    for _ in 0..9 {
        assert_eq!(get(&client, &proxy.url("/")).await.status, StatusCode::OK);
    }
    // Its pooled connection closes, and nothing listens any more.
    ups[1].kill().await;
    for i in 0..30 {
        let a = get(&client, &proxy.url("/")).await;
        assert_eq!(a.status, StatusCode::OK, "request {i}: {}", a.body);
        assert_ne!(a.body, "b");
    }
    let dead = proxy.endpoint(ups[1].addr);
    assert!(dead.ejected, "{dead:?}");
    assert_eq!(dead.connect_failures, 1, "one failed attempt, then ejected");
    let picks = dead.picks;
    for _ in 0..30 {
        assert_eq!(get(&client, &proxy.url("/")).await.status, StatusCode::OK);
    }
    assert_eq!(proxy.endpoint(ups[1].addr).picks, picks, "no more attempts");
    assert_eq!(ups[0].hits() + ups[2].hits(), 6 + 60);
}

#[tokio::test]
async fn an_endpoint_set_change_applies_to_the_next_request() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let proxy = Proxy::start(full(
        view(false, false),
        vec![service("http", &[a.addr, b.addr])],
    ))
    .await;
    let client = http1();
    for _ in 0..4 {
        assert_ne!(get(&client, &proxy.url("/")).await.body, "c");
    }
    assert_eq!(a.open.load(SeqCst), 1);
    proxy
        .state
        .apply(&pb::Update {
            nonce: 2,
            full: false,
            view_json: None,
            services: vec![service("http", &[c.addr])],
            removed_services: vec![],
            vips_replace: false,
            vips: vec![],
        })
        .unwrap();
    for _ in 0..5 {
        assert_eq!(get(&client, &proxy.url("/")).await.body, "c");
    }
    assert_eq!((a.hits(), b.hits(), c.hits()), (2, 2, 5));
    // The pooled connections to the endpoints that left are closed.
    eventually("connections to a and b closed", || {
        a.open.load(SeqCst) + b.open.load(SeqCst) == 0
    })
    .await;
}

#[tokio::test]
async fn no_endpoints_is_a_503() {
    let proxy = Proxy::start(full(view(false, false), vec![service("http", &[])])).await;
    let a = get(&http1(), &proxy.url("/")).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.body, "weft: no endpoints for service backend");
    // Every endpoint unreachable: a 502 once each was tried (and ejected).
    let dead = [closed_port().await, closed_port().await];
    proxy
        .state
        .apply(&full(view(false, false), vec![service("http", &dead)]))
        .unwrap();
    let a = get(&http1(), &proxy.url("/")).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.body);
    assert!(
        a.body.contains("no endpoint reachable (2 tried"),
        "{}",
        a.body
    );
    // The service gone altogether: tcp, so the connection just closes.
    proxy
        .state
        .apply(&full(view(false, false), vec![]))
        .unwrap();
    let r = tokio::time::timeout(
        WAIT,
        http1().request(
            Request::get(proxy.url("/"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test]
async fn h2c_requests_and_trailers_go_through() {
    let up = Upstream::start("a").await;
    let proxy = Proxy::start(full(view(false, false), vec![service("grpc", &[up.addr])])).await;
    // Many concurrent first requests make and share one upstream connection.
    let client = h2c();
    let url = proxy.url("/");
    let all = futures::future::join_all((0..20).map(|_| get(&client, &url))).await;
    assert!(all.iter().all(|a| a.status == StatusCode::OK));
    assert_eq!(up.open.load(SeqCst), 1);
    let a = get(&h2c(), &proxy.url("/trailers")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-version"), "HTTP/2.0");
    assert_eq!(a.header("x-host"), proxy.addr.to_string());
    assert_eq!(a.body, "a");
    let trailers = a.trailers.expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    // An HTTP/1.1 application calling an http2 service: HTTP/2 upstream, Host as authority.
    let req = Request::get(proxy.url("/x"))
        .header("host", "backend.mesh")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(&http1(), req).await;
    assert_eq!(a.header("x-version"), "HTTP/2.0");
    assert_eq!(a.header("x-host"), "backend.mesh");
    assert_eq!(a.header("x-path"), "/x");
}

#[tokio::test]
async fn draining_finishes_in_flight_requests_then_closes() {
    let up = Upstream::start("a").await;
    let proxy = Proxy::start(full(view(false, false), vec![service("http", &[up.addr])])).await;
    let client = http1();
    let slow = tokio::spawn({
        let client = client.clone();
        let url = proxy.url("/slow");
        async move { get(&client, &url).await }
    });
    eventually("the slow request reaches the upstream", || up.hits() == 1).await;
    proxy.ctx.draining.cancel();
    tokio::time::timeout(WAIT, proxy.run)
        .await
        .expect("stops accepting")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(proxy.addr).await.is_err(),
        "not listening"
    );
    proxy.ctx.tasks.close();
    // Connections stay until their request is answered.
    let waiting = proxy.ctx.tasks.clone();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), waiting.wait())
            .await
            .is_err()
    );
    up.release.add_permits(1);
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    tokio::time::timeout(WAIT, proxy.ctx.tasks.wait())
        .await
        .expect("every connection closes after its last request");
}

#[tokio::test]
async fn run_all_serves_each_outbound_then_stops_on_drain() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let mut sa = service("http", &[a.addr]);
    sa.service = "svc-a".into();
    let mut sb = service("http", &[b.addr]);
    sb.service = "svc-b".into();
    let view = format!(
        r#"{{"mesh":"{MESH}","dataplane":"web-1","inbounds":[],"outbounds":{{"svc-a":{{}},"svc-b":{{}}}}}}"#
    );
    let state = State::new();
    state.apply(&full(view, vec![sa, sb])).unwrap();
    let ctx = Context {
        state,
        identity: Identity::new(MESH),
        metrics: Arc::new(Metrics::new(Labels::default())),
        labels: Arc::new(Labels::default()),
        draining: CancellationToken::new(),
        tasks: TaskTracker::new(),
    };
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for svc in ["svc-a", "svc-b", "svc-none"] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(l.local_addr().unwrap());
        listeners.push((l, Outbound::new(svc)));
    }
    let run = tokio::spawn(outbound::run_all(listeners, ctx.clone()));
    let client = http1();
    for _ in 0..2 {
        let r = get(&client, &format!("http://{}/", addrs[1])).await;
        assert_eq!(r.headers["x-upstream"], "b");
        let r = get(&client, &format!("http://{}/", addrs[0])).await;
        assert_eq!(r.headers["x-upstream"], "a");
    }
    // An unknown service is served as TCP without endpoints: accepted, then closed.
    let mut none = TcpStream::connect(addrs[2]).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(WAIT, none.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!((a.hits(), b.hits()), (2, 2));
    ctx.draining.cancel();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("stops accepting")
        .unwrap()
        .unwrap();
    for addr in addrs {
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "{addr} still listening"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// L4

#[tokio::test]
async fn tcp_echoes_and_skips_a_dead_endpoint() {
    let dead = closed_port().await;
    let live = echo().await;
    let proxy = Proxy::start(full(
        view(false, false),
        vec![service("tcp", &[dead, live])],
    ))
    .await;
    for i in 0..4u8 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let msg = [b'p', b'i', b'n', b'g', b'0' + i];
        s.write_all(&msg).await.unwrap();
        let mut buf = [0u8; 5];
        tokio::time::timeout(WAIT, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, msg);
    }
    let d = proxy.endpoint(dead);
    assert!(d.ejected && d.connect_failures == 1, "{d:?}");
}

// ---------------------------------------------------------------------------------------------
// mTLS

/// A mesh's root and one zone intermediate, issuing identities.
struct Ca {
    root: RootCa,
    zone: IntermediateCa,
}

impl Ca {
    fn new(mesh: &str) -> Ca {
        let hour = Duration::from_secs(3600);
        let root = RootCa::generate(mesh, 10 * hour).unwrap();
        let key = pki::new_key().unwrap();
        let csr = pki::intermediate_csr(mesh, "east", &key).unwrap();
        let cert = root.sign_intermediate(&csr, "east", 5 * hour).unwrap();
        let zone = IntermediateCa::from_pem(&cert, &key, root.cert_pem()).unwrap();
        Ca { root, zone }
    }

    fn identity(&self, service: &str) -> Arc<Identity> {
        let mesh = self.root.mesh();
        let key = pki::new_key().unwrap();
        let csr = pki::workload_csr(mesh, service, &key).unwrap();
        let w = self
            .zone
            .issue_workload(
                &csr,
                mesh,
                service,
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        let id = Identity::new(mesh);
        id.install(&key, &w.chain_pem, &[self.root.cert_pem().to_string()])
            .unwrap();
        id
    }
}

#[tokio::test]
async fn mtls_reaches_the_expected_service_only() {
    let ca = Ca::new(MESH);
    let good = Upstream::start_tls("good", ca.identity("backend")).await;
    let h2 = Upstream::start_tls("h2", ca.identity("backend")).await;
    let impostor = Upstream::start_tls("impostor", ca.identity("payments")).await;
    let proxy = Proxy::start_as(
        full(view(true, false), vec![service("http", &[good.addr])]),
        ca.identity("web"),
    )
    .await;
    let client = http1();
    for _ in 0..3 {
        let a = get(&client, &proxy.url("/")).await;
        assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "good"));
    }
    assert_eq!(good.open.load(SeqCst), 1, "one pooled TLS connection");

    // grpc: HTTP/2 negotiated with ALPN under TLS.
    proxy
        .state
        .apply(&full(view(true, false), vec![service("grpc", &[h2.addr])]))
        .unwrap();
    let a = get(&h2c(), &proxy.url("/trailers")).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "h2"));
    assert_eq!(a.header("x-version"), "HTTP/2.0");

    // An endpoint presenting another service's identity is refused (and ejected).
    proxy
        .state
        .apply(&full(
            view(true, false),
            vec![service("http", &[impostor.addr])],
        ))
        .unwrap();
    let a = get(&client, &proxy.url("/")).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.body);
    assert!(a.body.contains("TLS handshake"), "{}", a.body);
    assert_eq!(impostor.hits(), 0);
    assert_eq!(proxy.endpoint(impostor.addr).connect_failures, 1);

    // Plaintext to a TLS upstream is not what mTLS means: the mesh flag decides.
    proxy
        .state
        .apply(&full(
            view(false, false),
            vec![service("http", &[good.addr])],
        ))
        .unwrap();
    let a = get(&client, &proxy.url("/")).await;
    assert_ne!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn mtls_sends_the_endpoints_zone_as_sni() {
    let ca = Ca::new(MESH);
    let east = Upstream::start_tls("east", ca.identity("backend")).await;
    let west = Upstream::start_tls("west-ingress", ca.identity("backend")).await;
    let zoned = |addr: SocketAddr, zone: &str| {
        let mut s = service("http", &[addr]);
        s.endpoints[0].zone = zone.into();
        s
    };
    let proxy = Proxy::start_as(
        full(view(true, false), vec![zoned(east.addr, "east")]),
        ca.identity("web"),
    )
    .await;
    let client = http1();
    let a = get(&client, &proxy.url("/")).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "east"));
    assert_eq!(*east.snis.lock().unwrap(), ["backend.east.default.weft"]);
    // Another zone's endpoint (its ingress): the SNI names that zone; the server is still
    // verified by its SPIFFE ID (spiffe://default/backend).
    proxy
        .state
        .apply(&full(view(true, false), vec![zoned(west.addr, "west")]))
        .unwrap();
    let a = get(&client, &proxy.url("/")).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::OK, "west-ingress")
    );
    assert_eq!(*west.snis.lock().unwrap(), ["backend.west.default.weft"]);
}

#[tokio::test]
async fn an_endpoint_with_a_server_identity_is_verified_as_that_identity() {
    let ca = Ca::new(MESH);
    let egress = Upstream::start_tls("egress", ca.identity("zone-egress.east")).await;
    let backend = Upstream::start_tls("backend", ca.identity("backend")).await;
    let via = |addr: SocketAddr| {
        let mut s = service("http", &[addr]);
        s.endpoints[0].server_identity = format!("spiffe://{MESH}/zone-egress.east");
        s
    };
    let proxy = Proxy::start_as(
        full(view(true, false), vec![via(egress.addr)]),
        ca.identity("web"),
    )
    .await;
    let client = http1();
    // The zone egress of an external service: verified as the egress, SNI names the service.
    let a = get(&client, &proxy.url("/")).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "egress"));
    assert_eq!(*egress.snis.lock().unwrap(), ["backend.east.default.weft"]);
    // A server that is the service itself, where the egress is expected, is refused.
    proxy
        .state
        .apply(&full(view(true, false), vec![via(backend.addr)]))
        .unwrap();
    let a = get(&client, &proxy.url("/")).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.body);
    assert_eq!(backend.hits(), 0);
    // A bad identity is refused by field.
    let mut bad = via(egress.addr);
    bad.endpoints[0].server_identity = "not a spiffe id".into();
    let err = proxy
        .state
        .apply(&full(view(true, false), vec![bad]))
        .unwrap_err();
    assert!(err.contains("endpoints[0].server_identity"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// MeshTimeout

/// A view whose outbound `backend` has the MeshTimeout conf `timeout` (JSON).
fn view_with_timeout(mtls: bool, timeout: &str) -> String {
    format!(
        r#"{{"mesh":"{MESH}","dataplane":"web-1","mtls":{mtls},"inbounds":[],"outbounds":{{"backend":{{"MeshTimeout":{timeout}}}}}}}"#
    )
}

/// Read until the peer closes; how long that took.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn request_timeout_answers_504_and_follows_policy_changes() {
    let up = Upstream::start("a").await;
    let proxy = Proxy::start(full(
        view_with_timeout(false, r#"{"http":{"requestTimeout":"200ms"}}"#),
        vec![service("http", &[up.addr])],
    ))
    .await;
    let client = http1();
    let start = std::time::Instant::now();
    let a = get(&client, &proxy.url("/slow")).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{}", a.body);
    assert_eq!(
        a.body,
        "weft: service backend: no response within 200ms (MeshTimeout http.requestTimeout)"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // Other requests are not affected.
    let a = get(&client, &proxy.url("/")).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "a"));

    // Without the policy a slow answer is waited for.
    proxy
        .state
        .apply(&full(view(false, false), vec![service("http", &[up.addr])]))
        .unwrap();
    let release = up.release.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        release.add_permits(1);
    });
    let a = get(&client, &proxy.url("/slow")).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "a"));
}

#[tokio::test]
async fn tcp_idle_timeout_closes_only_idle_connections() {
    let echo = echo().await;
    let proxy = Proxy::start(full(
        view_with_timeout(false, r#"{"idleTimeout":"300ms"}"#),
        vec![service("tcp", &[echo])],
    ))
    .await;
    // Busy: a byte every 100 ms keeps it open well past the idle timeout.
    let mut busy = TcpStream::connect(proxy.addr).await.unwrap();
    let mut last_byte = tokio::time::Instant::now();
    for i in 0..10u8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        busy.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(WAIT, busy.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b[0], i);
        last_byte = tokio::time::Instant::now();
    }
    // Then idle: closed about 300 ms after the last byte.
    closed_within(&mut busy, WAIT).await;
    let idle = last_byte.elapsed();
    assert!(
        idle >= Duration::from_millis(250),
        "closed {idle:?} after the last byte"
    );
}

#[tokio::test]
async fn http_idle_timeout_closes_an_idle_connection_but_not_a_waiting_one() {
    let up = Upstream::start("a").await;
    let proxy = Proxy::start(full(
        view_with_timeout(false, r#"{"idleTimeout":"300ms"}"#),
        vec![service("http", &[up.addr])],
    ))
    .await;
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: backend\r\n\r\n").into_bytes();
    // A request waiting longer than the idle timeout for its answer is not cut.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&request("/slow")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    up.release.add_permits(1);
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Then the kept-alive connection, idle, is closed.
    let took = closed_within(&mut s, WAIT).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
}

#[tokio::test]
async fn connection_timeout_bounds_the_tls_handshake() {
    // An endpoint that accepts TCP and never answers the ClientHello.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = mute.accept().await.unwrap();
            held.push(s);
        }
    });
    let ca = Ca::new(MESH);
    let proxy = Proxy::start_as(
        full(
            view_with_timeout(true, r#"{"connectionTimeout":"300ms"}"#),
            vec![service("http", &[mute_addr])],
        ),
        ca.identity("web"),
    )
    .await;
    let start = std::time::Instant::now();
    let a = get(&http1(), &proxy.url("/")).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.body);
    assert!(a.body.contains("timed out after 300ms"), "{}", a.body);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let ep = proxy.endpoint(mute_addr);
    assert!(ep.ejected && ep.connect_failures == 1, "{ep:?}");
}
