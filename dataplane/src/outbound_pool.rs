//! Upstream connections of an outbound: connecting (MeshTimeout `connectionTimeout`, 1 s by
//! default, for the TCP connect and for the TLS handshake; TCP_NODELAY; TLS with the
//! expected SPIFFE ID when the mesh has mTLS) and the per-endpoint pools.
//!
//! HTTP/1.1: idle connections are kept per endpoint, most recently used first, at most
//! [`MAX_IDLE`], dropped after [`IDLE_TIMEOUT`] unused or once the server closed them. A
//! connection goes back to the pool when its response body has been read to the end.
//! HTTP/2: one shared connection per endpoint, replaced when it closes.
//!
//! A pool belongs to its [`lb::Endpoint`]: when the endpoint leaves the service's set, the
//! pool goes with it and its idle connections close.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::Instrument;
use weft_core::pki::SpiffeId;
use weft_core::spec::fields::Protocol;

use crate::lb;
use crate::metrics::Direction;
use crate::state::Context;
use crate::timeouts::within;
use crate::tls;

/// Idle HTTP/1.1 connections unused this long are closed (lazily).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per endpoint.
pub const MAX_IDLE: usize = 256;

type Endpoint = lb::Endpoint<Pool>;

/// The connections to one endpoint.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<Incoming>>>,
    /// Held while making the HTTP/2 connection.
    pub(super) connecting: tokio::sync::Mutex<()>,
    /// The SNI for this endpoint (its service, zone and mesh never change: an endpoint whose
    /// zone changes gets a new pool, see `lb`), made on the first TLS connection.
    sni: OnceLock<rustls_pki_types::ServerName<'static>>,
}

#[derive(Debug)]
struct Idle {
    tx: http1::SendRequest<Incoming>,
    since: Instant,
}

impl Pool {
    /// The most recently used idle HTTP/1.1 connection still open.
    pub(super) fn take_h1(&self) -> Option<http1::SendRequest<Incoming>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(i) = idle.pop() {
            if i.tx.is_closed() {
                continue;
            }
            if i.since.elapsed() > IDLE_TIMEOUT {
                // The most recent one is too old: so are all the others.
                idle.clear();
                return None;
            }
            return Some(i.tx);
        }
        None
    }

    /// Give back an HTTP/1.1 connection whose last response was read to the end.
    pub(super) fn put_h1(&self, tx: http1::SendRequest<Incoming>) {
        if tx.is_closed() {
            return;
        }
        let since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= MAX_IDLE
            || idle
                .first()
                .is_some_and(|i| since.duration_since(i.since) > IDLE_TIMEOUT)
        {
            idle.remove(0);
        }
        idle.push(Idle { tx, since });
    }

    /// The shared HTTP/2 connection, if open.
    pub(super) fn h2(&self) -> Option<http2::SendRequest<Incoming>> {
        let h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        h2.as_ref().filter(|tx| !tx.is_closed()).cloned()
    }

    pub(super) fn set_h2(&self, tx: &http2::SendRequest<Incoming>) {
        *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
    }

    /// Idle HTTP/1.1 connections now (for tests and `/config`).
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("connect to {0}: {1}")]
    Connect(String, io::Error),
    #[error("connect to {0}: timed out after {1:?}")]
    Timeout(String, Duration),
    #[error("TLS handshake with {0}: {1}")]
    Tls(String, io::Error),
    #[error("HTTP/2 handshake with {0}: {1}")]
    Handshake(String, hyper::Error),
    /// Not the endpoint's fault (e.g. the mesh or service name is not a valid SPIFFE ID).
    #[error("{0}")]
    Config(String),
}

impl ConnectError {
    /// The endpoint is to blame: eject it.
    pub(super) fn ejects(&self) -> bool {
        !matches!(self, ConnectError::Config(_))
    }
}

/// A connection to an endpoint: plain TCP, or TLS over it.
pub(super) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Connect to `ep` for `service`: TCP, then TLS with ALPN `alpn` when the mesh has mTLS,
/// each within `limit`. Reports the outcome to the endpoint's health: ejected on failure,
/// healthy on success.
pub(super) async fn connect(
    ep: &Endpoint,
    ctx: &Context,
    service: &str,
    alpn: &[&[u8]],
    limit: Option<Duration>,
) -> Result<Io, ConnectError> {
    let r = connect_inner(ep, ctx, service, alpn, limit).await;
    match &r {
        Ok(_) => ep.connected(),
        Err(e) if e.ejects() => {
            let d = ep.eject();
            tracing::warn!(service, "{e}; endpoint ejected for {d:?}");
        }
        Err(_) => {}
    }
    r
}

async fn connect_inner(
    ep: &Endpoint,
    ctx: &Context,
    service: &str,
    alpn: &[&[u8]],
    limit: Option<Duration>,
) -> Result<Io, ConnectError> {
    let authority = || ep.authority();
    let connecting = async {
        match ep.addr {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((ep.endpoint.address.as_str(), ep.endpoint.port)).await,
        }
    };
    let tcp = match within(limit, connecting).await {
        Some(Ok(tcp)) => tcp,
        Some(Err(e)) => return Err(ConnectError::Connect(authority(), e)),
        None => {
            return Err(ConnectError::Timeout(
                authority(),
                limit.unwrap_or_default(),
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    if !ep.mtls {
        return Ok(Io::Plain(tcp));
    }
    let mesh = ctx.state.view().mesh.clone();
    // The service's own identity, unless the zone names another server (the zone egress
    // of an external service).
    let expected = match &ep.endpoint.server_identity {
        Some(id) => id.clone(),
        None => SpiffeId::new(&mesh, service).map_err(|e| {
            ConnectError::Config(format!("mTLS to service {service} of mesh {mesh}: {e}"))
        })?,
    };
    let sni = match ep.ext.sni.get() {
        Some(sni) => sni.clone(),
        None => {
            // An endpoint without a zone is in ours.
            let zone = match ep.endpoint.zone.as_str() {
                "" => ctx.labels.zone.as_str(),
                z => z,
            };
            let sni = tls::sni(&mesh, service, zone).map_err(ConnectError::Config)?;
            ep.ext.sni.get_or_init(|| sni).clone()
        }
    };
    let config = ctx
        .identity
        .client_config(&expected, alpn.iter().map(|p| p.to_vec()).collect());
    let handshake = tokio_rustls::TlsConnector::from(config).connect(sni, tcp);
    let r = match within(limit, handshake).await {
        Some(Ok(tls)) => Ok(Io::Tls(Box::new(tls))),
        Some(Err(e)) => Err(ConnectError::Tls(authority(), e)),
        None => Err(ConnectError::Tls(
            authority(),
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out after {:?}", limit.unwrap_or_default()),
            ),
        )),
    };
    ctx.metrics.tls_handshake(Direction::Outbound, r.is_ok());
    r
}

/// ALPN for an upstream of `protocol`.
pub(super) fn alpn(protocol: Protocol) -> &'static [&'static [u8]] {
    match protocol {
        Protocol::Http2 | Protocol::Grpc => &[b"h2"],
        Protocol::Http => &[b"http/1.1"],
        Protocol::Tcp => &[],
    }
}

/// A new HTTP/1.1 connection to `ep`; its connection task runs until the last handle to it
/// is dropped or the server closes it.
pub(super) async fn connect_h1(
    ep: &Endpoint,
    ctx: &Context,
    service: &str,
    limit: Option<Duration>,
) -> Result<http1::SendRequest<Incoming>, ConnectError> {
    let io = connect(ep, ctx, service, alpn(Protocol::Http), limit).await?;
    let (tx, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| {
            ep.eject();
            ConnectError::Handshake(ep.authority(), e)
        })?;
    let span = tracing::debug_span!("upstream", service, endpoint = %ep.authority());
    tokio::spawn(
        async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream connection: {e}");
            }
        }
        .instrument(span),
    );
    Ok(tx)
}

/// A new HTTP/2 connection to `ep` (prior knowledge, or ALPN h2 under TLS).
pub(super) async fn connect_h2(
    ep: &Endpoint,
    ctx: &Context,
    service: &str,
    limit: Option<Duration>,
) -> Result<http2::SendRequest<Incoming>, ConnectError> {
    let io = connect(ep, ctx, service, alpn(Protocol::Http2), limit).await?;
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| {
            ep.eject();
            ConnectError::Handshake(ep.authority(), e)
        })?;
    let span = tracing::debug_span!("upstream", service, endpoint = %ep.authority());
    tokio::spawn(
        async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream connection: {e}");
            }
        }
        .instrument(span),
    );
    Ok(tx)
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// For `Pool: Default` holders that want to know (tests): keep the type `Send + Sync`.
const _: fn() = || {
    fn check<T: Send + Sync>() {}
    check::<Pool>();
    check::<Arc<Endpoint>>();
};
