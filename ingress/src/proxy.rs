//! The data path: accept TCP, read the ClientHello ([`hello`](crate::hello)), route by SNI
//! to a local endpoint of `(mesh, service)`, replay the buffered bytes, then splice both
//! directions until both sides are done.
//!
//! **The ingress never terminates TLS and holds no key**: the handshake is end to end between
//! the other zone's proxy and the local proxy, which authenticate each other with the mesh's
//! mTLS certificates. The SNI `<service>.<zone>.<mesh>.weft` is only a routing hint; it
//! carries nothing the server's certificate does not also prove.
//!
//! Refusals (the connection is closed, nothing reaches a backend, counted in
//! `weft_ingress_refused_total{reason}`): not TLS, no SNI, not a weft SNI, another zone's
//! SNI, an unknown service, a service without endpoints; also a malformed or oversized
//! ClientHello, none within the deadline, or a client that leaves early. Endpoints are tried
//! round robin; a refused or timed-out connect moves to the next endpoint (each failure
//! counted in `weft_ingress_upstream_connect_failures_total`).
//!
//! Half-close: when one side ends its stream, the ingress shuts down writing to the other
//! and keeps carrying the other direction until it ends too.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;
use weft_core::names::Sni;

use crate::hello;
use crate::metrics::{Conn, Metrics, Reason};
use crate::table::{Endpoint, Routes, Service, Table};

/// The data path's timers.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// The whole ClientHello must arrive within this.
    pub hello_timeout: Duration,
    /// Per endpoint attempt.
    pub connect_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What the listener needs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Context {
    pub routes: Routes,
    pub metrics: Arc<Metrics>,
    /// Cancelled on SIGTERM: the listener stops accepting; open connections go on.
    pub draining: CancellationToken,
    /// Every connection task runs on this tracker, so that the caller can wait for them to
    /// finish (with a deadline) after `draining`.
    pub tasks: TaskTracker,
    pub timing: Timing,
}

impl Context {
    pub fn new(routes: Routes, metrics: Arc<Metrics>) -> Context {
        Context {
            routes,
            metrics,
            draining: CancellationToken::new(),
            tasks: TaskTracker::new(),
            timing: Timing::default(),
        }
    }
}

/// A refusal: the reason (for the metric) and what to log.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub detail: String,
}

fn refusal(reason: Reason, detail: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        detail: detail.into(),
    }
}

/// Where a ClientHello with `server_name` goes in `table`: the service, or why not.
pub fn route(table: &Table, server_name: Option<&str>) -> Result<(Sni, Arc<Service>), Refusal> {
    let name = server_name.ok_or_else(|| refusal(Reason::NoSni, "no SNI in the ClientHello"))?;
    let sni: Sni = name
        .parse()
        .map_err(|e: String| refusal(Reason::BadSni, e))?;
    if sni.zone != table.zone {
        return Err(refusal(
            Reason::OtherZone,
            format!(
                "SNI {name:?} is for zone {:?}; this ingress serves zone {:?}",
                sni.zone, table.zone
            ),
        ));
    }
    let service = table.get(&sni.mesh, &sni.service).ok_or_else(|| {
        refusal(
            Reason::UnknownService,
            format!(
                "no service {:?} in mesh {:?} in this zone",
                sni.service, sni.mesh
            ),
        )
    })?;
    if service.endpoints.is_empty() {
        return Err(refusal(
            Reason::NoEndpoint,
            format!(
                "service {:?} of mesh {:?} has no endpoints",
                sni.service, sni.mesh
            ),
        ));
    }
    let service = service.clone();
    Ok((sni, service))
}

/// Accept on `listener` until `ctx.draining`; each connection is a task on `ctx.tasks`.
pub async fn serve(listener: TcpListener, ctx: Context) -> io::Result<()> {
    loop {
        let (stream, peer) = tokio::select! {
            _ = ctx.draining.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let span = tracing::debug_span!("conn", %peer);
        ctx.tasks
            .spawn(handle(stream, peer, ctx.clone()).instrument(span));
    }
}

async fn handle(mut client: TcpStream, peer: SocketAddr, ctx: Context) {
    let _ = client.set_nodelay(true);
    let read = tokio::time::timeout(ctx.timing.hello_timeout, hello::read(&mut client)).await;
    let (hello, buffered) = match read {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let reason = match &e {
                hello::Error::Plaintext => Reason::Plaintext,
                hello::Error::Malformed(_) | hello::Error::TooLarge => Reason::BadTls,
                hello::Error::Closed | hello::Error::Io(_) => Reason::EarlyClose,
            };
            return refuse(&ctx, refusal(reason, e.to_string()));
        }
        Err(_) => {
            return refuse(
                &ctx,
                refusal(
                    Reason::Timeout,
                    format!(
                        "no complete ClientHello within {:?}",
                        ctx.timing.hello_timeout
                    ),
                ),
            );
        }
    };
    let table = ctx.routes.current();
    let (sni, service) = match route(&table, hello.server_name.as_deref()) {
        Ok(r) => r,
        Err(r) => return refuse(&ctx, r),
    };
    drop(table);
    let Some(upstream) = connect(&ctx, &service, service.pick()).await else {
        tracing::warn!(
            %sni, endpoints = service.endpoints.len(),
            "no endpoint of the service accepted the connection; closing"
        );
        return;
    };
    let conn = ctx.metrics.conn(&sni.mesh, &sni.service);
    let _active = ctx.metrics.opened(&sni.mesh, &sni.service, &conn);
    pass(client, upstream, buffered, &conn, &sni, peer).await;
}

/// The passthrough itself: replay the `buffered` ClientHello to `upstream`, then splice both
/// directions until both sides are done, counting the client side's bytes in `conn`. The
/// ingress and the egress's cross-zone routes (`routing.zoneEgress`) both end here.
pub async fn pass(
    client: TcpStream,
    mut upstream: TcpStream,
    buffered: Vec<u8>,
    conn: &Conn,
    sni: &Sni,
    peer: SocketAddr,
) {
    conn.rx.inc_by(buffered.len() as u64);
    tracing::debug!(%sni, upstream = ?upstream.peer_addr().ok(), "routed");
    if let Err(e) = upstream.write_all(&buffered).await {
        tracing::debug!(%sni, error = %e, "writing the ClientHello to the endpoint");
        return;
    }
    drop(buffered);
    let mut client = Counted {
        io: client,
        rx: conn.rx.clone(),
        tx: conn.tx.clone(),
    };
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(%sni, %peer, up, down, "connection done"),
        Err(e) => tracing::debug!(%sni, %peer, error = %e, "connection ended with an error"),
    }
}

/// Count and log a refusal. A weft SNI this zone cannot serve (another zone's, an unknown
/// service, no endpoints) points at a configuration problem somewhere: a warning. Anything
/// else is what scanners and health checks send: debug, so they cannot flood the log.
fn refuse(ctx: &Context, r: Refusal) {
    ctx.metrics.refused(r.reason);
    match r.reason {
        Reason::OtherZone | Reason::UnknownService | Reason::NoEndpoint => {
            tracing::warn!(reason = r.reason.as_str(), detail = %r.detail, "connection refused")
        }
        _ => tracing::debug!(reason = r.reason.as_str(), detail = %r.detail, "connection refused"),
    }
}

/// Connect to `endpoints` of `service` (in the order given: [`Service::pick`] is round
/// robin) until one accepts.
pub async fn connect<'a>(
    ctx: &Context,
    service: &Service,
    endpoints: impl Iterator<Item = &'a Endpoint>,
) -> Option<TcpStream> {
    for ep in endpoints {
        let attempt = tokio::time::timeout(
            ctx.timing.connect_timeout,
            TcpStream::connect((ep.address.as_str(), ep.port)),
        )
        .await;
        let error = match attempt {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Some(s);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", ctx.timing.connect_timeout),
        };
        ctx.metrics.upstream_failure();
        tracing::warn!(
            mesh = %service.mesh, service = %service.service,
            endpoint = %ep.authority(), dataplane = %ep.dataplane, %error,
            zone = %ep.zone, "connecting to an endpoint failed; trying the next one"
        );
    }
    None
}

/// The downstream socket, counting bytes read (`rx`) and written (`tx`); the egress counts
/// its callers' side with it too.
pub(crate) struct Counted<S> {
    pub(crate) io: S,
    pub(crate) rx: Counter,
    pub(crate) tx: Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.rx.inc_by(n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.tx.inc_by(n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_table() -> Table {
        let mut t = Table {
            zone: "east".into(),
            ..Default::default()
        };
        let ep = Endpoint {
            address: "127.0.0.1".into(),
            port: 1,
            dataplane: "dp".into(),
            zone: "east".into(),
        };
        t.services.insert(
            crate::table::Key::new("payments", "backend"),
            Arc::new(Service::new("payments", "backend", "tcp", vec![ep])),
        );
        t.services.insert(
            crate::table::Key::new("payments", "empty"),
            Arc::new(Service::new("payments", "empty", "tcp", vec![])),
        );
        t
    }

    #[test]
    fn routing_decisions() {
        let t = mk_table();
        let (sni, s) = route(&t, Some("backend.east.payments.weft")).unwrap();
        assert_eq!(sni, Sni::new("payments", "backend", "east"));
        assert_eq!(s.service, "backend");
        // DNS names are case-insensitive.
        assert!(route(&t, Some("Backend.EAST.payments.weft")).is_ok());
        let reason = |name: Option<&str>| route(&t, name).unwrap_err().reason;
        assert_eq!(reason(None), Reason::NoSni);
        assert_eq!(reason(Some("example.com")), Reason::BadSni);
        assert_eq!(reason(Some("backend.east.payments.com")), Reason::BadSni);
        assert_eq!(
            reason(Some("backend.west.payments.weft")),
            Reason::OtherZone
        );
        assert_eq!(
            reason(Some("nope.east.payments.weft")),
            Reason::UnknownService
        );
        assert_eq!(
            reason(Some("backend.east.shop.weft")),
            Reason::UnknownService
        );
        assert_eq!(reason(Some("empty.east.payments.weft")), Reason::NoEndpoint);
        let err = route(&t, Some("backend.west.payments.weft")).unwrap_err();
        assert!(err.detail.contains("\"west\""), "{}", err.detail);
    }

    #[test]
    fn no_zone_yet_routes_nothing() {
        let mut t = mk_table();
        t.zone.clear();
        assert_eq!(
            route(&t, Some("backend.east.payments.weft"))
                .unwrap_err()
                .reason,
            Reason::OtherZone
        );
    }
}
