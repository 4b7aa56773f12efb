//! Transparent mode for real: the test moves one thread into a network namespace of its own
//! (`unshare(CLONE_NEWNET)`), applies the rules `weft-dp transparent-rules` prints with
//! iptables there, and calls the VIPs directly, as an application with no proxy settings
//! would. The transparent listener must find each connection's original destination and send
//! it to that VIP's service (HTTP and TCP, pinned zone), close what is no VIP:port, and count.
//! Needs root (CI runs as root) and iptables.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_dp::metrics::Metrics;
use weft_dp::state::{Context, Labels, State};
use weft_dp::tls::Identity;
use weft_dp::transparent;
use weft_proto::dataplane::v1 as pb;

const WAIT: Duration = Duration::from_secs(10);
const VIEW: &str = r#"{"mesh":"default","dataplane":"web-1","inbounds":[],"outbounds":{}}"#;
const PORT: u16 = 15001;

fn mk_ctx() -> Context {
    let labels = Labels {
        mesh: "default".into(),
        zone: "east".into(),
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

fn endpoint(addr: SocketAddr, zone: &str) -> pb::Endpoint {
    pb::Endpoint {
        address: addr.ip().to_string(),
        port: addr.port().into(),
        dataplane: format!("backend-{}", addr.port()),
        zone: zone.into(),
        tags: Default::default(),
        weight: 1,
        ..Default::default()
    }
}

fn service(name: &str, protocol: &str, endpoints: Vec<pb::Endpoint>) -> pb::ServiceEndpoints {
    pb::ServiceEndpoints {
        service: name.into(),
        protocol: protocol.into(),
        endpoints,
        ..Default::default()
    }
}

fn vip(name: &str, address: &str, port: u16) -> pb::Vip {
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
        ports: vec![port.into()],
    }
}

/// An HTTP/1.1 upstream answering its name.
async fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP upstream that echoes.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
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

/// Connect to `addr`, write, and read until EOF or error: what came back.
async fn exchange(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(msg).await;
    let mut buf = vec![0u8; msg.len().max(1)];
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() >= msg.len() {
                    break;
                }
            }
            Err(_) => panic!("{addr}: no answer and no close within {WAIT:?}"),
        }
    }
    got
}

fn metric(ctx: &Context, label: &str) -> f64 {
    ctx.metrics
        .render(&ctx.identity)
        .lines()
        .find(|l| l.starts_with("weft_dp_transparent_connections_total{") && l.contains(label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-ec", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Move the calling thread into a new network namespace with `lo` up and the transparent
/// rules of `weft-dp transparent-rules` applied. The namespace goes away with the thread.
fn enter_namespace() {
    // SAFETY: plain syscalls on the calling thread.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root: it creates a network namespace and iptables rules (run as root, as CI does)"
    );
    // SAFETY: unshare affects only the calling thread's network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    sh("ip link set lo up");
    let out = Command::new(env!("CARGO_BIN_EXE_weft-dp"))
        .args(["transparent-rules", "--outbound-port", &PORT.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = String::from_utf8(out.stdout).unwrap();
    assert!(rules.contains("127.240.0.0/12"), "{rules}");
    for line in rules.lines() {
        sh(line);
    }
}

/// Run `f` on a thread of its own inside a fresh network namespace, on a current-thread
/// runtime (so every socket is made in that namespace).
fn in_namespace<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        enter_namespace();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f());
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

#[test]
fn redirected_connections_reach_the_vips_service() {
    in_namespace(|| async {
        let ctx = mk_ctx();
        let east = upstream("backend-east").await;
        let west = upstream("backend-west").await;
        let db = echo().await;
        ctx.state
            .apply(&pb::Update {
                nonce: 1,
                full: true,
                view_json: Some(VIEW.into()),
                services: vec![
                    service(
                        "backend",
                        "http",
                        vec![endpoint(east, "east"), endpoint(west, "west")],
                    ),
                    service("db", "tcp", vec![endpoint(db, "east")]),
                ],
                removed_services: vec![],
                vips_replace: true,
                vips: vec![
                    vip("backend.mesh", "127.240.0.1", 80),
                    vip("backend.west.mesh", "127.240.0.2", 80),
                    vip("db.mesh", "127.240.0.3", 5432),
                ],
            })
            .unwrap();
        let listener = TcpListener::bind(("127.0.0.1", PORT)).await.unwrap();
        tokio::spawn(transparent::run(listener, ctx.clone()));

        // Nothing listens on the VIPs: only the redirection can answer.
        let any: SocketAddr = "127.240.0.1:80".parse().unwrap();
        let pinned: SocketAddr = "127.240.0.2:80".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(get(any).await.unwrap(), "backend-east", "ours first");
            assert_eq!(get(pinned).await.unwrap(), "backend-west", "pinned to west");
        }
        assert_eq!(
            exchange("127.240.0.3:5432".parse().unwrap(), b"select 1").await,
            b"select 1",
            "L4 for a tcp service"
        );
        assert_eq!(metric(&ctx, r#"result="vip""#), 7.0);

        // A VIP on a port it does not serve, an address that is no VIP: closed, counted.
        assert!(
            exchange("127.240.0.1:81".parse().unwrap(), b"x")
                .await
                .is_empty()
        );
        assert!(
            exchange("127.240.9.9:80".parse().unwrap(), b"x")
                .await
                .is_empty()
        );
        assert_eq!(metric(&ctx, r#"result="unknown""#), 2.0);
        // Straight to the listener, not redirected: closed, counted.
        let direct: SocketAddr = ([127, 0, 0, 1], PORT).into();
        assert!(exchange(direct, b"x").await.is_empty());
        assert_eq!(metric(&ctx, r#"result="not_redirected""#), 1.0);

        // The table changes: a new VIP works at once, a removed one is closed.
        ctx.state
            .apply(&pb::Update {
                nonce: 2,
                full: false,
                view_json: None,
                services: vec![],
                removed_services: vec![],
                vips_replace: true,
                vips: vec![vip("backend.mesh", "127.240.0.7", 8080)],
            })
            .unwrap();
        assert_eq!(
            get("127.240.0.7:8080".parse().unwrap()).await.unwrap(),
            "backend-east"
        );
        assert!(exchange(any, b"GET / HTTP/1.1\r\n\r\n").await.is_empty());
        assert_eq!(metric(&ctx, r#"result="unknown""#), 3.0);
    });
}
