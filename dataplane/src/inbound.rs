//! The inbound listener: terminates mTLS, authorizes the caller by SPIFFE ID against
//! MeshTrafficPermission, forwards to the application.
//!
//! CONTRACT (traffic side implements; `main` calls `run` once per Dataplane inbound after the
//! first config, and the certificate when the mesh has mTLS, are in place).
//!
//! When the current view has mTLS, each connection starts with a TLS 1.3 handshake
//! ([`crate::tls::Identity::server_config`]: a client certificate of this mesh is required);
//! the caller is the service of the peer's SPIFFE ID. Without mTLS the inbound is plaintext and
//! MeshTrafficPermission is not enforced (as in Kuma).
//!
//! - http, http2, grpc: a hyper server (HTTP/1.1 or HTTP/2, by ALPN or preface) forwarding
//!   over a pooled client to the application (HTTP/1.1 for http, HTTP/2 prior knowledge for
//!   http2 and grpc). MeshTrafficPermission is checked on every request against the current
//!   view (the decision is cached per connection until the configuration changes), so a
//!   policy change applies to kept-alive connections too. A denied request gets a 403 (gRPC:
//!   200 with `grpc-status: 7`). The application sees `x-forwarded-client-cert` with the
//!   caller's SPIFFE ID (any incoming one is dropped). Draining closes connections after
//!   their in-flight requests.
//! - tcp: authorized when the connection starts and again on every configuration change; a
//!   denied connection is reset (SO_LINGER 0). Bytes are copied both ways.
//!
//! MeshTimeout (the inbound's `rules`, see `timeouts.rs`): `http.requestTimeout` bounds the
//! wait for the application's response headers (then `504`); `idleTimeout` closes a
//! connection idle that long (TCP: no bytes either way; HTTP: no request in flight and no
//! bytes), read when the connection starts.
//!
//! A plaintext connection accepted before the mesh turned mTLS on is refused from then on
//! (HTTP: 403 per request; TCP: reset). An unreachable application gets a 502 (HTTP) or a
//! closed connection (TCP), and a warning.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;
use weft_core::policy::ProxyView;
use weft_core::spec::fields::Protocol;
use weft_core::spec::policies::Action;

use crate::metrics::{Counted, Direction, ServiceMetrics};
use crate::state::{Context, Snapshot};
use crate::timeouts::{Clock, Timeouts, copy_bidirectional_idle, idle_clock, idle_expired, within};

#[derive(Clone, Debug)]
pub struct Inbound {
    /// The inbound's port as in the Dataplane (and `ProxyView.inbounds[].port`).
    pub port: u16,
    /// The service this inbound serves (`weft.io/service`).
    pub service: String,
    /// `tcp` unless the inbound says otherwise.
    pub protocol: Protocol,
    /// Where the application listens (127.0.0.1 and `servicePort`, or `port`).
    pub app: SocketAddr,
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the application may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections to the application are closed after this.
const POOL_IDLE: Duration = Duration::from_secs(90);

static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Serve `listener` until `ctx.draining` is cancelled; spawn each connection on `ctx.tasks`.
pub async fn run(listener: TcpListener, inbound: Inbound, ctx: Context) -> anyhow::Result<()> {
    let port = inbound.port;
    let shared = Arc::new(Listener::new(inbound, ctx.clone())?);
    tracing::debug!(port, service = %shared.inbound.service, protocol = ?shared.inbound.protocol, app = %shared.inbound.app, "inbound listening");
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = ctx.draining.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little.
                    tracing::warn!(port, error = %e, "inbound: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let l = shared.clone();
        ctx.tasks.spawn(
            l.serve(stream, peer)
                .instrument(tracing::debug_span!("conn", %peer)),
        );
    }
}

/// What every connection of one inbound shares.
struct Listener {
    inbound: Inbound,
    ctx: Context,
    metrics: Arc<ServiceMetrics>,
    /// The TLS server side (it reads the installed certificate at each handshake).
    tls: tokio_rustls::TlsAcceptor,
    http: Option<Http>,
    /// MeshTimeout for this inbound and the configuration generation it was read from.
    timeouts: std::sync::Mutex<(u64, Timeouts)>,
}

struct Http {
    server: auto::Builder<TokioExecutor>,
    client: Client<HttpConnector, Incoming>,
    app: Authority,
    version: Version,
    grpc: bool,
}

type Body = Either<Incoming, Full<Bytes>>;

impl Listener {
    fn new(inbound: Inbound, ctx: Context) -> anyhow::Result<Listener> {
        let metrics = ctx.metrics.service(Direction::Inbound, &inbound.service);
        let http = match inbound.protocol {
            Protocol::Tcp => None,
            p => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
                let h2 = p != Protocol::Http;
                let client = Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(POOL_IDLE)
                    .http2_only(h2)
                    .build(connector);
                let mut server = auto::Builder::new(TokioExecutor::new());
                // No header read timeout: hyper arms it for every request, and a timer
                // earlier than the runtime's next wake-up costs an eventfd write and an extra
                // epoll_wait per request (a third of the proxy's system calls).
                server
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(None);
                server.http2().timer(TokioTimer::new());
                Some(Http {
                    server,
                    client,
                    app: Authority::try_from(inbound.app.to_string())?,
                    version: if h2 {
                        Version::HTTP_2
                    } else {
                        Version::HTTP_11
                    },
                    grpc: p == Protocol::Grpc,
                })
            }
        };
        let alpn = if http.is_some() {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![]
        };
        let tls = ctx.identity.server_config(alpn).into();
        Ok(Listener {
            inbound,
            ctx,
            metrics,
            tls,
            http,
            timeouts: std::sync::Mutex::new((u64::MAX, Timeouts::default())),
        })
    }

    /// The MeshTimeout timeouts of this inbound now (read again after a configuration change).
    fn timeouts(&self) -> Timeouts {
        let snapshot = self.ctx.state.current();
        let mut t = self.timeouts.lock().unwrap_or_else(|e| e.into_inner());
        if t.0 != snapshot.generation {
            *t = (
                snapshot.generation,
                Timeouts::inbound(&snapshot.view, self.inbound.port),
            );
        }
        t.1
    }

    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _active = self.metrics.connection();
        let stream = Counted::new(stream, self.metrics.clone());
        if !self.ctx.state.view().mtls {
            return self.forward(stream, None).await;
        }
        let accept = self.tls.accept(stream);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.ctx.metrics.tls_handshake(Direction::Inbound, false);
                tracing::debug!(%peer, error = %e, "inbound: TLS handshake failed");
                return;
            }
            Err(_) => {
                self.ctx.metrics.tls_handshake(Direction::Inbound, false);
                tracing::debug!(%peer, "inbound: TLS handshake timed out");
                return;
            }
        };
        self.ctx.metrics.tls_handshake(Direction::Inbound, true);
        let Some(id) = crate::tls::peer_identity(tls.get_ref().1) else {
            // The verifier accepted it, so this does not happen; refuse anyway.
            tracing::debug!(%peer, "inbound: no SPIFFE ID on the peer's certificate");
            return;
        };
        tracing::trace!(%peer, %id, "inbound: mTLS established");
        let source = Source {
            xfcc: HeaderValue::try_from(format!(
                "By=spiffe://{}/{};URI={id}",
                self.ctx.identity.mesh(),
                self.inbound.service
            ))
            .ok(),
            service: id.service,
        };
        self.forward(tls, Some(source)).await;
    }

    async fn forward<S: Downstream>(self: Arc<Self>, stream: S, source: Option<Source>) {
        if self.http.is_some() {
            self.serve_http(stream, source).await
        } else {
            self.serve_tcp(stream, source).await
        }
    }

    /// MeshTrafficPermission's decision for `source` on this inbound under `view`.
    fn decide(&self, view: &ProxyView, source: &str) -> Action {
        static NO_TAGS: BTreeMap<String, String> = BTreeMap::new();
        let action = match view.inbounds.iter().find(|i| i.port == self.inbound.port) {
            Some(i) => i.allows(source, &NO_TAGS, view.default_deny),
            None if view.default_deny => Action::Deny,
            None => Action::Allow,
        };
        if action == Action::AllowWithShadowDeny {
            tracing::info!(
                source,
                service = %self.inbound.service,
                "inbound: allowed, MeshTrafficPermission would deny (shadow)"
            );
        }
        action
    }

    fn deny_message(&self, source: &str) -> String {
        format!(
            "weft: {source} is not allowed to call {} (MeshTrafficPermission)",
            self.inbound.service
        )
    }

    // -----------------------------------------------------------------------------------------
    // TCP

    async fn serve_tcp<S: Downstream>(&self, mut down: S, source: Option<Source>) {
        let mut changes = self.ctx.state.subscribe();
        if !self.tcp_allowed(&changes.borrow_and_update(), source.as_ref()) {
            return reset(down);
        }
        let app = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.inbound.app))
            .await
        {
            Ok(Ok(app)) => app,
            Ok(Err(e)) => {
                tracing::warn!(app = %self.inbound.app, error = %e, "inbound: application unreachable");
                let _ = down.shutdown().await;
                return;
            }
            Err(_) => {
                tracing::warn!(app = %self.inbound.app, "inbound: application unreachable (connect timed out)");
                let _ = down.shutdown().await;
                return;
            }
        };
        let _ = app.set_nodelay(true);
        let mut app = app;
        let idle = idle_clock(self.timeouts().idle);
        if let Some((clock, _)) = &idle {
            down.counted().watch(clock.clone());
        }
        let denied = {
            let copy = copy_bidirectional_idle(
                &mut down,
                &mut app,
                idle.as_ref().map(|(c, d)| (&**c, *d)),
            );
            tokio::pin!(copy);
            let mut watching = true;
            loop {
                tokio::select! {
                    r = &mut copy => {
                        match r {
                            Ok(Some(_)) => {}
                            Ok(None) => tracing::debug!(
                                "inbound: tcp connection idle for {:?} (MeshTimeout idleTimeout): closed",
                                idle.as_ref().map(|(_, d)| *d).unwrap_or_default()
                            ),
                            Err(e) => tracing::debug!(error = %e, "inbound: tcp connection ended"),
                        }
                        break false;
                    }
                    r = changes.changed(), if watching => {
                        if r.is_err() {
                            watching = false;
                        } else if !self.tcp_allowed(&changes.borrow_and_update(), source.as_ref()) {
                            break true;
                        }
                    }
                }
            }
        };
        if denied {
            let _ = app.set_zero_linger();
            reset(down);
        }
    }

    /// Whether a TCP connection from `source` may go on under `snapshot`; counts and logs a
    /// refusal.
    fn tcp_allowed(&self, snapshot: &Snapshot, source: Option<&Source>) -> bool {
        let view = &snapshot.view;
        let refused = match source {
            Some(s) => self.decide(view, &s.service) == Action::Deny,
            // A plaintext connection once the mesh requires mTLS.
            None => view.mtls,
        };
        if refused {
            let who = source.map_or("plaintext", |s| s.service.as_str());
            self.metrics.authz_denied(who);
            tracing::debug!(source = who, service = %self.inbound.service, "inbound: tcp connection denied");
        }
        !refused
    }

    // -----------------------------------------------------------------------------------------
    // HTTP

    async fn serve_http<S: Downstream>(self: Arc<Self>, mut down: S, source: Option<Source>) {
        let draining = self.ctx.draining.clone();
        let idle = idle_clock(self.timeouts().idle);
        let clock = idle.as_ref().map(|(c, _)| c.clone());
        if let Some(clock) = &clock {
            down.counted().watch(clock.clone());
        }
        let conn = Arc::new(HttpConn {
            listener: self.clone(),
            source,
            decision: AtomicU64::new(0),
            clock: clock.clone(),
        });
        let service = hyper::service::service_fn(move |req| conn.clone().handle(req));
        let http = self.http.as_ref().expect("an http inbound");
        let served = http.server.serve_connection(TokioIo::new(down), service);
        tokio::pin!(served);
        let r = tokio::select! {
            r = served.as_mut() => r,
            _ = draining.cancelled() => {
                served.as_mut().graceful_shutdown();
                served.await
            }
            () = idle_expired(idle.as_ref()) => {
                tracing::debug!("inbound: http connection idle (MeshTimeout idleTimeout): closing");
                served.as_mut().graceful_shutdown();
                served.await
            }
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "inbound: http connection ended");
        }
    }
}

/// Who is calling, on an mTLS connection.
struct Source {
    service: String,
    /// `x-forwarded-client-cert` for the application.
    xfcc: Option<HeaderValue>,
}

/// One HTTP connection.
struct HttpConn {
    listener: Arc<Listener>,
    source: Option<Source>,
    /// The last decision: `generation << 2 | action`, 0 for none yet.
    decision: AtomicU64,
    /// With an idle timeout: the connection's activity.
    clock: Option<Arc<Clock>>,
}

const ALLOW: u64 = 1;
const DENY: u64 = 2;

impl HttpConn {
    /// Whether the caller may make a request now: the decision for the current configuration,
    /// computed once per configuration change.
    fn allowed(&self, source: &Source) -> bool {
        let snapshot = self.listener.ctx.state.current();
        let cached = self.decision.load(Ordering::Relaxed);
        if cached != 0 && cached >> 2 == snapshot.generation {
            return cached & 3 == ALLOW;
        }
        let action = self.listener.decide(&snapshot.view, &source.service);
        let bit = if action == Action::Deny { DENY } else { ALLOW };
        self.decision
            .store(snapshot.generation << 2 | bit, Ordering::Relaxed);
        bit == ALLOW
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let l = &*self.listener;
        let http = l.http.as_ref().expect("an http inbound");
        let _in_flight = self.clock.as_ref().map(|c| c.request());
        let resp = match self.route(l, http, req) {
            Route::Forward(fut) => {
                let limit = l.timeouts().request;
                match within(limit, fut).await {
                    Some(Ok(resp)) => resp.map(Either::Left),
                    Some(Err(e)) => {
                        tracing::warn!(app = %l.inbound.app, error = %e, "inbound: application unreachable");
                        plain(
                            StatusCode::BAD_GATEWAY,
                            "weft: the application is unreachable\n",
                        )
                    }
                    None => {
                        let message = format!(
                            "weft: no response from the application within {:?} (MeshTimeout http.requestTimeout)",
                            limit.unwrap_or_default()
                        );
                        tracing::debug!(app = %l.inbound.app, "inbound: {message}");
                        if http.grpc {
                            // DEADLINE_EXCEEDED
                            grpc_status(4, &message)
                        } else {
                            plain(StatusCode::GATEWAY_TIMEOUT, format!("{message}\n"))
                        }
                    }
                }
            }
            Route::Answer(resp) => resp,
        };
        l.metrics.request(resp.status().as_u16(), start.elapsed());
        Ok(resp)
    }

    /// Authorize and rewrite a request for the application, or answer it.
    fn route(&self, l: &Listener, http: &Http, req: Request<Incoming>) -> Route {
        match &self.source {
            Some(source) => {
                if !self.allowed(source) {
                    l.metrics.authz_denied(&source.service);
                    let message = l.deny_message(&source.service);
                    tracing::debug!(source = %source.service, service = %l.inbound.service, "inbound: request denied");
                    return Route::Answer(if http.grpc {
                        grpc_status(7, &message)
                    } else {
                        plain(StatusCode::FORBIDDEN, format!("{message}\n"))
                    });
                }
            }
            None => {
                if l.ctx.state.view().mtls {
                    // A plaintext connection from before the mesh turned mTLS on.
                    l.metrics.authz_denied("plaintext");
                    return Route::Answer(plain(
                        StatusCode::FORBIDDEN,
                        "weft: mTLS is required\n".to_string(),
                    ));
                }
            }
        }
        let (mut parts, body) = req.into_parts();
        parts.headers.remove(&XFCC);
        if let Some(xfcc) = self.source.as_ref().and_then(|s| s.xfcc.clone()) {
            parts.headers.insert(XFCC.clone(), xfcc);
        }
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        if http.version == Version::HTTP_11
            && !parts.headers.contains_key(HOST)
            && let Some(host) = uri
                .authority
                .as_ref()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            // An HTTP/2 caller to an HTTP/1.1 application: keep its `:authority` as `Host`.
            parts.headers.insert(HOST, host);
        }
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(http.app.clone());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        parts.uri = Uri::from_parts(uri).expect("scheme, authority and path make a URI");
        parts.version = http.version;
        Route::Forward(http.client.request(Request::from_parts(parts, body)))
    }
}

enum Route {
    Forward(hyper_util::client::legacy::ResponseFuture),
    Answer(Response<Body>),
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A trailers-only gRPC answer.
fn grpc_status(code: u16, message: &str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::try_from(percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    resp
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII but `%` as is.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A downstream connection: plaintext or TLS over a counted socket.
trait Downstream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn socket(&self) -> &TcpStream;
    /// The counted socket (under TLS: the ciphertext).
    fn counted(&mut self) -> &mut Counted<TcpStream>;
}

impl Downstream for Counted<TcpStream> {
    fn socket(&self) -> &TcpStream {
        self.get_ref()
    }

    fn counted(&mut self) -> &mut Counted<TcpStream> {
        self
    }
}

impl Downstream for tokio_rustls::server::TlsStream<Counted<TcpStream>> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0.get_ref()
    }

    fn counted(&mut self) -> &mut Counted<TcpStream> {
        self.get_mut().0
    }
}

/// Close with a TCP reset.
fn reset<S: Downstream>(down: S) {
    let _ = down.socket().set_zero_linger();
    drop(down);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a b%c\n"), "a b%25c%0A");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }
}
