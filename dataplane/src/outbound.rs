//! An outbound listener: the application connects to it in plaintext; the proxy balances over
//! the service's endpoints and originates mTLS, checking the server's SPIFFE ID.
//!
//! `main` serves every Dataplane outbound with [`run_all`] (one task; an idle outbound holds
//! its socket and service name, its [`Handler`] is made on its first connection); the VIP
//! listeners use [`run`], one each. Each accepted connection is L7 when the
//! service's protocol (looked up per connection) is http, http2 or grpc: a hyper server
//! (HTTP/1.1, or HTTP/2 with prior knowledge) that balances every request on its own over
//! pooled upstream connections ([`Pool`]; HTTP/1.1 to http services, HTTP/2 to http2 and
//! grpc ones). Otherwise L4: one endpoint per connection, bytes copied both ways.
//!
//! Timeouts come from MeshTimeout (`timeouts.rs`): `connectionTimeout` (1 s by default),
//! `idleTimeout`, `http.requestTimeout`.
//!
//! Failures: connection-level ones (refused, connect timeout, TLS handshake) eject the
//! endpoint ([`lb`]) and the request or connection is retried on another endpoint, since
//! nothing of it was sent. No endpoints: `503 weft: no endpoints for service <name>` (L7) or
//! the connection is closed (L4).
//!
//! Submodules: `outbound_http.rs` (the L7 proxy and its response body), `outbound_pool.rs`
//! (connecting, TLS, per-endpoint connection pools), `outbound_tcp.rs` (L4).

#[path = "outbound_http.rs"]
mod http;
#[path = "outbound_pool.rs"]
mod pool;
#[path = "outbound_tcp.rs"]
mod tcp;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;
use weft_core::spec::fields::Protocol;

use crate::lb;
use crate::metrics::{Direction, ServiceMetrics};
use crate::state::Context;

pub use pool::Pool;

/// The balancer of one outbound, with its connection pools per endpoint.
pub type Balancer = lb::Balancer<Pool>;

#[derive(Clone, Debug)]
pub struct Outbound {
    /// The service called (`weft.io/service` of the outbound's tags).
    pub service: String,
    /// Only this zone's endpoints (a VIP of `<service>.<zone>.mesh`); `None`: every zone,
    /// the proxy's own first.
    pub zone: Option<String>,
}

impl Outbound {
    pub fn new(service: &str) -> Outbound {
        Outbound {
            service: service.to_string(),
            zone: None,
        }
    }
}

/// Serve `listener` until `ctx.draining` is cancelled; spawn each connection on `ctx.tasks`.
/// L7 (per-request balancing) when the service's protocol is http, http2 or grpc; L4 for tcp.
pub async fn run(listener: TcpListener, outbound: Outbound, ctx: Context) -> anyhow::Result<()> {
    let balancer = balancer(&outbound, &ctx);
    serve(listener, balancer, ctx).await
}

/// The balancer [`serve`] uses for `outbound`: cheap until the first connection.
pub fn balancer(outbound: &Outbound, ctx: &Context) -> Arc<Balancer> {
    let locality = match &outbound.zone {
        Some(zone) => lb::Locality::pinned(&ctx.labels.zone, zone),
        None => lb::Locality::new(&ctx.labels.zone),
    };
    Arc::new(Balancer::with_locality(
        &outbound.service,
        locality,
        &ctx.state,
    ))
}

/// [`run`] with a given balancer (to look at its endpoints from outside, e.g. in tests).
pub async fn serve(
    listener: TcpListener,
    balancer: Arc<Balancer>,
    ctx: Context,
) -> anyhow::Result<()> {
    let handler = Handler::with_balancer(balancer, ctx.clone());
    let shared = handler.0.clone();
    let local = listener.local_addr()?;
    tracing::debug!(service = shared.lb.service(), %local, "outbound listening");
    loop {
        let accepted = tokio::select! {
            biased;
            _ = ctx.draining.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off a little, keep serving.
                tracing::warn!(service = shared.lb.service(), %local, "outbound accept: {e}");
                tokio::select! {
                    _ = ctx.draining.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        handler.spawn(stream, peer);
    }
    tracing::debug!(service = shared.lb.service(), %local, "outbound stopped accepting");
    Ok(())
}

/// Serve many outbound listeners (the Dataplane's declared outbounds) on one task until
/// `ctx.draining` is cancelled: each as [`run`] would, but an outbound nobody calls costs its
/// socket, its service name and a small accept state, not a task, a span and a balancer of
/// its own (about 2 KiB each, which a thousand idle outbounds would hold). An outbound's
/// [`Handler`] (and so its balancer) is made on its first connection.
pub async fn run_all(listeners: Vec<(TcpListener, Outbound)>, ctx: Context) -> anyhow::Result<()> {
    let ctx = Arc::new(ctx);
    let mut accepting: FuturesUnordered<Accept> = listeners
        .into_iter()
        .map(|(listener, outbound)| {
            tracing::debug!(
                service = outbound.service,
                local = ?listener.local_addr().ok(),
                "outbound listening"
            );
            Accept {
                listener,
                outbound,
                ctx: ctx.clone(),
                handler: None,
                backoff: None,
            }
        })
        .collect();
    // An `Accept` never ends: polling the set only runs the listeners that were woken.
    let serve = std::future::poll_fn(|cx| {
        let _ = accepting.poll_next_unpin(cx);
        std::task::Poll::<()>::Pending
    });
    tokio::select! {
        biased;
        _ = ctx.draining.cancelled() => {}
        _ = serve => {}
    }
    tracing::debug!(listeners = accepting.len(), "outbounds stopped accepting");
    Ok(())
}

/// One listener of [`run_all`]: accepts and hands each connection to the outbound's
/// [`Handler`], made on the first one.
struct Accept {
    listener: TcpListener,
    outbound: Outbound,
    ctx: Arc<Context>,
    handler: Option<Handler>,
    /// After a failed accept (out of file descriptors and the like): wait a little.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for Accept {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = &mut *self;
        loop {
            if let Some(backoff) = &mut this.backoff {
                std::task::ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            match std::task::ready!(this.listener.poll_accept(cx)) {
                Ok((stream, peer)) => {
                    let (outbound, ctx) = (&this.outbound, &this.ctx);
                    this.handler
                        .get_or_insert_with(|| Handler::new(outbound, ctx))
                        .spawn(stream, peer);
                }
                Err(e) => {
                    tracing::warn!(
                        service = this.outbound.service,
                        local = ?this.listener.local_addr().ok(),
                        "outbound accept: {e}"
                    );
                    this.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
                }
            }
        }
    }
}

/// An outbound without a listener of its own: serves connections accepted elsewhere (the
/// transparent mode's redirected ones) exactly as [`serve`] serves its own. Cheap to clone.
#[derive(Clone)]
pub struct Handler(Arc<Shared>);

impl Handler {
    /// The handler of `outbound`; `ctx.draining` ends its HTTP connections after their
    /// in-flight requests.
    pub fn new(outbound: &Outbound, ctx: &Context) -> Handler {
        Handler::with_balancer(balancer(outbound, ctx), ctx.clone())
    }

    fn with_balancer(balancer: Arc<Balancer>, ctx: Context) -> Handler {
        Handler(Arc::new(Shared::new(balancer, ctx)))
    }

    /// Serve one accepted connection on a task of `ctx.tasks`: L7 when the service's
    /// protocol (looked up now) is http, http2 or grpc, else L4.
    pub fn spawn(&self, stream: TcpStream, peer: SocketAddr) {
        let shared = self.0.clone();
        let _ = stream.set_nodelay(true);
        let protocol = shared
            .ctx
            .state
            .service(shared.lb.service())
            .map_or(Protocol::Tcp, |s| s.protocol);
        let span = tracing::debug_span!("outbound", service = shared.lb.service(), %peer);
        let tasks = shared.ctx.tasks.clone();
        tasks.spawn(
            async move {
                match protocol {
                    Protocol::Tcp => tcp::serve(stream, &shared).await,
                    Protocol::Http | Protocol::Http2 | Protocol::Grpc => {
                        http::serve(stream, shared).await
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// What every connection of one outbound shares.
struct Shared {
    lb: Arc<Balancer>,
    ctx: Context,
    /// The outbound's series, resolved on the first connection.
    metrics: OnceLock<Arc<ServiceMetrics>>,
    /// Milliseconds (since the listener started) of the last "no endpoints" warning, to log
    /// it at most once a second.
    warned: AtomicU64,
    started: std::time::Instant,
}

impl Shared {
    fn new(lb: Arc<Balancer>, ctx: Context) -> Shared {
        Shared {
            lb,
            ctx,
            metrics: OnceLock::new(),
            warned: AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }

    fn metrics(&self) -> &Arc<ServiceMetrics> {
        self.metrics.get_or_init(|| {
            self.ctx
                .metrics
                .service(Direction::Outbound, self.lb.service())
        })
    }

    /// Whether to log a recurring failure now (at most once a second per outbound).
    fn should_warn(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64 + 1000;
        let last = self.warned.load(Relaxed);
        now >= last + 1000
            && self
                .warned
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}
