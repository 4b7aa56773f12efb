//! The L7 outbound: a hyper server on the application's connection (HTTP/1.1, or HTTP/2
//! with prior knowledge) that balances each request on its own and sends it over a pooled
//! upstream connection: HTTP/1.1 for http services, HTTP/2 for http2 and grpc ones.
//!
//! Requests keep their method, path, headers (Host included; hop-by-hop ones dropped) and
//! stream their bodies both ways, trailers included. A request is retried on another
//! endpoint only when nothing of it was sent: the connection failed, or a pooled connection
//! closed before the request was written.
//!
//! MeshTimeout: `http.requestTimeout` bounds the wait for the response's headers (then
//! `504`); `idleTimeout` closes an application connection with no request in flight and no
//! bytes for that long (read when the connection starts).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use weft_core::spec::fields::Protocol;

use super::Shared;
use super::pool::{self, Pool};
use crate::lb::{Guard, Pick, Tried};
use crate::metrics::Counted;
use crate::timeouts::{idle_clock, idle_expired, within};

type Endpoint = crate::lb::Endpoint<Pool>;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The server side, one for every outbound.
fn server() -> &'static auto::Builder<TokioExecutor> {
    static SERVER: OnceLock<auto::Builder<TokioExecutor>> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut b = auto::Builder::new(TokioExecutor::new());
        // Application to its own sidecar: no header read timeout (it would arm a timer per
        // request), keep-alive on.
        b.http1().keep_alive(true).header_read_timeout(None);
        b
    })
}

/// Serve one application connection until it closes, or until draining (then the requests
/// in flight finish and the connection closes).
pub(super) async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let metrics = shared.metrics();
    let _active = metrics.connection();
    let mut stream = Counted::new(stream, metrics.clone());
    let idle = idle_clock(shared.lb.timeouts().idle);
    if let Some((clock, _)) = &idle {
        stream.watch(clock.clone());
    }
    let s = shared.clone();
    let clock = idle.as_ref().map(|(c, _)| c.clone());
    let service = hyper::service::service_fn(move |req| {
        let s = s.clone();
        let in_flight = clock.as_ref().map(|c| c.request());
        async move {
            let start = Instant::now();
            let resp = proxy(&s, req).await;
            drop(in_flight);
            s.metrics().request(resp.status().as_u16(), start.elapsed());
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = server().serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = shared.ctx.draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = idle_expired(idle.as_ref()) => {
            tracing::debug!(
                service = shared.lb.service(),
                "outbound connection idle (MeshTimeout idleTimeout): closing"
            );
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!("outbound connection: {e}");
    }
}

/// What sending on one endpoint gave.
enum Sent {
    Response(Response<Incoming>, Option<http1::SendRequest<Incoming>>),
    /// Nothing was sent: the request back, and why.
    Retry(Request<Incoming>, String),
    /// The request was (at least partly) sent, then failed: not retried.
    Failed(String),
}

async fn proxy(s: &Shared, req: Request<Incoming>) -> Response<Body> {
    let timeouts = s.lb.timeouts();
    match within(timeouts.request, proxy_within(s, req, timeouts.connect)).await {
        Some(resp) => resp,
        None => {
            let msg = format!(
                "weft: service {}: no response within {:?} (MeshTimeout http.requestTimeout)",
                s.lb.service(),
                timeouts.request.unwrap_or_default()
            );
            tracing::debug!("{msg}");
            error(StatusCode::GATEWAY_TIMEOUT, msg)
        }
    }
}

async fn proxy_within(
    s: &Shared,
    mut req: Request<Incoming>,
    connect: Option<Duration>,
) -> Response<Body> {
    let version = req.version();
    strip_hop_by_hop(req.headers_mut());
    let mut tried = Tried::new();
    let mut last = String::new();
    loop {
        let ep = match s.lb.pick(&tried) {
            Pick::Endpoint(ep) => ep,
            Pick::NoEndpoints => {
                let msg = format!("weft: no endpoints for service {}", s.lb.service());
                if s.should_warn() {
                    tracing::warn!(service = s.lb.service(), "{msg}");
                }
                return error(StatusCode::SERVICE_UNAVAILABLE, msg);
            }
            Pick::Exhausted => {
                let msg = format!(
                    "weft: service {}: no endpoint reachable ({} tried, last: {last})",
                    s.lb.service(),
                    tried.len()
                );
                if s.should_warn() {
                    tracing::warn!(service = s.lb.service(), "{msg}");
                }
                return error(StatusCode::BAD_GATEWAY, msg);
            }
        };
        tried.add(&*ep);
        let sent = match ep.protocol {
            Protocol::Http2 | Protocol::Grpc => send_h2(s, &ep, req, connect).await,
            Protocol::Http | Protocol::Tcp => send_h1(s, &ep, req, connect).await,
        };
        match sent {
            Sent::Response(resp, reuse) => return respond(resp, ep, reuse, version),
            Sent::Retry(r, why) => {
                tracing::debug!(
                    service = s.lb.service(),
                    "retrying on another endpoint: {why}"
                );
                req = r;
                last = why;
            }
            Sent::Failed(why) => {
                let msg = format!(
                    "weft: service {} endpoint {}: {why}",
                    s.lb.service(),
                    ep.authority()
                );
                tracing::debug!("{msg}");
                return error(StatusCode::BAD_GATEWAY, msg);
            }
        }
    }
}

async fn send_h1(
    s: &Shared,
    ep: &Endpoint,
    mut req: Request<Incoming>,
    connect: Option<Duration>,
) -> Sent {
    to_h1(&mut req);
    // Pooled connections first. One the server closed before our request was written gives
    // the request back: try the next, then a new connection.
    while let Some(mut tx) = ep.ext.take_h1() {
        // Idle connections are ready at once, but one may still be writing the previous
        // request's body (the server answered early): not worth waiting long for.
        if !tx.is_ready()
            && !matches!(
                tokio::time::timeout(Duration::from_millis(50), tx.ready()).await,
                Ok(Ok(()))
            )
        {
            continue;
        }
        match tx.try_send_request(req).await {
            Ok(resp) => return Sent::Response(resp, Some(tx)),
            Err(mut e) => match e.take_message() {
                Some(r) => req = r,
                None => return Sent::Failed(e.into_error().to_string()),
            },
        }
    }
    let mut tx = match pool::connect_h1(ep, &s.ctx, s.lb.service(), connect).await {
        Ok(tx) => tx,
        Err(e) => return Sent::Retry(req, e.to_string()),
    };
    match tx.try_send_request(req).await {
        Ok(resp) => Sent::Response(resp, Some(tx)),
        Err(mut e) => match e.take_message() {
            Some(r) => Sent::Retry(r, e.into_error().to_string()),
            None => Sent::Failed(e.into_error().to_string()),
        },
    }
}

async fn send_h2(
    s: &Shared,
    ep: &Endpoint,
    mut req: Request<Incoming>,
    connect: Option<Duration>,
) -> Sent {
    to_h2(&mut req, ep);
    if let Some(mut tx) = ep.ext.h2()
        && tx.ready().await.is_ok()
    {
        match tx.try_send_request(req).await {
            Ok(resp) => return Sent::Response(resp, None),
            Err(mut e) => match e.take_message() {
                Some(r) => req = r,
                None => return Sent::Failed(e.into_error().to_string()),
            },
        }
    }
    // One connection per endpoint: whoever connects first, the others wait and share it.
    let connecting = ep.ext.connecting.lock().await;
    let mut tx = match ep.ext.h2() {
        Some(tx) => tx,
        None => match pool::connect_h2(ep, &s.ctx, s.lb.service(), connect).await {
            Ok(tx) => {
                ep.ext.set_h2(&tx);
                tx
            }
            Err(e) => return Sent::Retry(req, e.to_string()),
        },
    };
    drop(connecting);
    if let Err(e) = tx.ready().await {
        return Sent::Retry(req, e.to_string());
    }
    match tx.try_send_request(req).await {
        Ok(resp) => Sent::Response(resp, None),
        Err(mut e) => match e.take_message() {
            Some(r) => Sent::Retry(r, e.into_error().to_string()),
            None => Sent::Failed(e.into_error().to_string()),
        },
    }
}

fn respond(
    mut resp: Response<Incoming>,
    ep: Guard<Pool>,
    reuse: Option<http1::SendRequest<Incoming>>,
    version: Version,
) -> Response<Body> {
    if resp.headers().contains_key(header::CONNECTION) {
        strip_hop_by_hop(resp.headers_mut());
    }
    *resp.version_mut() = version;
    resp.map(|body| Body {
        inner: Inner::Upstream {
            body,
            done: Some(Done { ep, reuse }),
        },
    })
}

fn error(status: StatusCode, msg: String) -> Response<Body> {
    let mut resp = Response::new(Body {
        inner: Inner::Full(Some(Bytes::from(msg))),
    });
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Headers that describe one hop, not the request: `Connection` and what it names,
/// `Keep-Alive`, `Proxy-Connection`, `Upgrade`. (hyper drops the others, e.g.
/// `Transfer-Encoding` towards HTTP/2, itself.)
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(c) = headers.remove(header::CONNECTION) {
        if let Ok(names) = c.to_str() {
            for name in names.split(',') {
                let name = name.trim();
                if !name.is_empty() && !name.eq_ignore_ascii_case("te") {
                    headers.remove(name);
                }
            }
        }
        headers.remove(KEEP_ALIVE);
        headers.remove(header::UPGRADE);
    }
    headers.remove(PROXY_CONNECTION);
}

/// An HTTP/1.1 request: from HTTP/2, the `:authority` becomes `Host` and the target its
/// origin form.
fn to_h1(req: &mut Request<Incoming>) {
    match req.version() {
        Version::HTTP_11 => return,
        Version::HTTP_2 | Version::HTTP_3 => {
            if !req.headers().contains_key(header::HOST)
                && let Some(a) = req.uri().authority()
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(header::HOST, v);
            }
            if req.uri().scheme().is_some() {
                let target = req
                    .uri()
                    .path_and_query()
                    .cloned()
                    .map_or_else(|| Uri::from_static("/"), Uri::from);
                *req.uri_mut() = target;
            }
        }
        _ => {}
    }
    *req.version_mut() = Version::HTTP_11;
}

/// An HTTP/2 request: the target in absolute form, `Host` becomes `:authority`.
fn to_h2(req: &mut Request<Incoming>, ep: &Endpoint) {
    if req.uri().scheme().is_none() || req.uri().authority().is_none() {
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .or_else(|| req.uri().authority().cloned())
            .or_else(|| Authority::try_from(ep.authority()).ok());
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = authority;
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
    }
    req.headers_mut().remove(header::HOST);
    *req.version_mut() = Version::HTTP_2;
}

/// The response body: the upstream's streamed through, or the proxy's own answer.
pub(super) struct Body {
    inner: Inner,
}

enum Inner {
    Full(Option<Bytes>),
    Upstream { body: Incoming, done: Option<Done> },
}

/// Held until the upstream response has been read: the endpoint's in-flight count and the
/// HTTP/1.1 connection to give back to the pool.
struct Done {
    ep: Guard<Pool>,
    reuse: Option<http1::SendRequest<Incoming>>,
}

impl Done {
    fn finish(self, complete: bool) {
        if complete && let Some(tx) = self.reuse {
            self.ep.ext.put_h1(tx);
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream { body, done } => {
                let frame = ready!(Pin::new(&mut *body).poll_frame(cx));
                match &frame {
                    None => {
                        if let Some(d) = done.take() {
                            d.finish(true);
                        }
                    }
                    Some(Ok(_)) => {
                        if body.is_end_stream()
                            && let Some(d) = done.take()
                        {
                            d.finish(true);
                        }
                    }
                    Some(Err(_)) => drop(done.take()),
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // hyper may drop a body without polling its end (e.g. a known length fully sent).
        if let Inner::Upstream { body, done } = &mut self.inner
            && let Some(d) = done.take()
        {
            d.finish(body.is_end_stream());
        }
    }
}
