//! MeshTimeout as the proxy applies it.
//!
//! Outbound, per called service (the merged `to` conf, `ProxyView.outbounds[service]`):
//! - `connectionTimeout`: the TCP connect and the TLS handshake to an endpoint, each
//!   (default [`DEFAULT_CONNECT`]); an endpoint that does not make it is ejected and the next
//!   one is tried, as for a refused connection;
//! - `idleTimeout`: a TCP connection with no bytes either way for that long is closed; an
//!   HTTP connection from the application with no request in flight and no bytes for that
//!   long is closed (default: none);
//! - `http.requestTimeout`: the response's headers must arrive within that long of the
//!   request, else the application gets `504` (default: none).
//!
//! Inbound, per inbound (the merged `rules` conf over the `from` entry for every caller):
//! `idleTimeout` and `http.requestTimeout` the same way, towards the application.
//!
//! A zero duration means no timeout (`connectionTimeout: 0s` waits as long as the OS does).
//! `http.streamIdleTimeout`, `maxStreamDuration`, `maxConnectionDuration` and
//! `requestHeadersTimeout` are accepted and not enforced yet.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use weft_core::Kind;
use weft_core::policy::ProxyView;
use weft_core::spec::policies::MeshTimeoutConf;
use weft_core::spec::target_ref::TargetKind;

/// Connecting and the TLS handshake, when no MeshTimeout sets `connectionTimeout`: short,
/// so that a dead endpoint is ejected and the request moves on quickly.
pub const DEFAULT_CONNECT: Duration = Duration::from_secs(1);

/// The timeouts in force for one outbound service or one inbound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting and the TLS handshake, each; `None`: no limit.
    pub connect: Option<Duration>,
    /// Close a connection idle this long; `None`: never.
    pub idle: Option<Duration>,
    /// Response headers within this long of the request, else 504; `None`: no limit.
    pub request: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Some(DEFAULT_CONNECT),
            idle: None,
            request: None,
        }
    }
}

impl Timeouts {
    /// What the view's MeshTimeout says for calls to `service`.
    pub fn outbound(view: &ProxyView, service: &str) -> Timeouts {
        Timeouts::from_conf(
            view.outbounds
                .get(service)
                .and_then(|confs| confs.get(&Kind::MeshTimeout)),
        )
    }

    /// What the view's MeshTimeout says for the inbound on `port`: its `rules`, over its
    /// `from` entry for every caller (`targetRef: {kind: Mesh}`), field by field. (A
    /// connection's timeouts are set before its caller is known, so `from` entries for some
    /// callers only do not apply.)
    pub fn inbound(view: &ProxyView, port: u16) -> Timeouts {
        let Some(inbound) = view.inbounds.iter().find(|i| i.port == port) else {
            return Timeouts::default();
        };
        let everyone = inbound
            .from
            .get(&Kind::MeshTimeout)
            .and_then(|entries| {
                entries
                    .iter()
                    .find(|e| e.target_ref.kind == TargetKind::Mesh)
            })
            .map(|e| &e.conf);
        let rules = inbound.rules.get(&Kind::MeshTimeout);
        match (everyone, rules) {
            (Some(base), Some(over)) => {
                let mut conf = base.clone();
                weft_core::policy::merge(&mut conf, over);
                Timeouts::from_conf(Some(&conf))
            }
            (conf, None) | (None, conf) => Timeouts::from_conf(conf),
        }
    }

    fn from_conf(conf: Option<&serde_json::Value>) -> Timeouts {
        let Some(conf) = conf else {
            return Timeouts::default();
        };
        // The control plane validated it; a conf this proxy cannot read (a newer field) is
        // logged and the defaults apply.
        let conf: MeshTimeoutConf = match serde_json::from_value(conf.clone()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("MeshTimeout: {e}; using the default timeouts");
                return Timeouts::default();
            }
        };
        let limit = |d: Option<weft_core::validate::Duration>| {
            d.map(|d| d.as_std()).filter(|d| !d.is_zero())
        };
        Timeouts {
            connect: match conf.connection_timeout {
                Some(d) => limit(Some(d)),
                None => Some(DEFAULT_CONNECT),
            },
            idle: limit(conf.idle_timeout),
            request: limit(conf.http.and_then(|h| h.request_timeout)),
        }
    }
}

/// `fut`, cut short after `limit` when there is one (`None` then).
pub async fn within<F: Future>(limit: Option<Duration>, fut: F) -> Option<F::Output> {
    match limit {
        Some(d) => tokio::time::timeout(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// When a connection last carried bytes (either way) and how many of its requests are
/// waiting for a response: what an idle timeout looks at. Shared by the connection's
/// [`crate::metrics::Counted`] stream and its request handler.
#[derive(Debug)]
pub struct Clock {
    start: Instant,
    /// Milliseconds since `start` of the last byte.
    last: AtomicU64,
    in_flight: AtomicU32,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            start: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
        }
    }
}

impl Clock {
    pub(crate) fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Relaxed))
    }

    /// A request is waiting for its response until the guard is dropped: the connection
    /// is not idle meanwhile, whatever its bytes do.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    /// Completes once the connection has been idle for `idle`: no request waiting and no
    /// byte either way.
    pub async fn idle(&self, idle: Duration) {
        loop {
            tokio::time::sleep_until(self.last() + idle).await;
            if self.in_flight.load(Relaxed) == 0 && self.last() + idle <= Instant::now() {
                return;
            }
            if self.in_flight.load(Relaxed) > 0 {
                // Waiting on a response: look again one idle period from now.
                self.touch();
            }
        }
    }
}

/// See [`Clock::request`].
pub struct InFlight(Arc<Clock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Copy both ways between `a` and `b` until either side closes (the byte counts), or, with
/// `idle`, until its clock (which one of the streams reports to, see
/// [`crate::metrics::Counted::watch`]) has been idle that long (`None`).
pub async fn copy_bidirectional_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Option<(&Clock, Duration)>,
) -> io::Result<Option<(u64, u64)>>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Some((clock, idle)) = idle else {
        return tokio::io::copy_bidirectional(a, b).await.map(Some);
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(a, b) => r.map(Some),
        () = clock.idle(idle) => Ok(None),
    }
}

/// With an idle timeout: a clock for a new connection and the timeout.
pub fn idle_clock(idle: Option<Duration>) -> Option<(Arc<Clock>, Duration)> {
    idle.map(|d| (Arc::new(Clock::default()), d))
}

/// Completes when the connection of [`idle_clock`]'s clock has been idle for its timeout;
/// never without one.
pub async fn idle_expired(idle: Option<&(Arc<Clock>, Duration)>) {
    match idle {
        Some((clock, d)) => clock.idle(*d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(outbound_timeout: Option<&str>) -> ProxyView {
        let outbounds = match outbound_timeout {
            Some(t) => format!(r#"{{"backend":{{"MeshTimeout":{t}}}}}"#),
            None => r#"{"backend":{}}"#.to_string(),
        };
        serde_json::from_str(&format!(
            r#"{{"mesh":"m","dataplane":"d","inbounds":[{{"port":8080,"service":"web","tags":{{}},"rules":{{"MeshTimeout":{{"idleTimeout":"10m","http":{{"requestTimeout":"2s"}}}}}}}}],"outbounds":{outbounds}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn defaults_without_a_policy() {
        let t = Timeouts::outbound(&view(None), "backend");
        assert_eq!(t, Timeouts::default());
        assert_eq!(t.connect, Some(DEFAULT_CONNECT));
        assert_eq!((t.idle, t.request), (None, None));
        assert_eq!(
            Timeouts::outbound(&view(None), "other"),
            Timeouts::default()
        );
    }

    #[test]
    fn outbound_conf_and_zero_means_no_limit() {
        let v = view(Some(
            r#"{"connectionTimeout":"0s","idleTimeout":"1h","http":{"requestTimeout":"1500ms","streamIdleTimeout":"5m"}}"#,
        ));
        let t = Timeouts::outbound(&v, "backend");
        assert_eq!(t.connect, None);
        assert_eq!(t.idle, Some(Duration::from_secs(3600)));
        assert_eq!(t.request, Some(Duration::from_millis(1500)));
        let v = view(Some(r#"{"http":{"requestTimeout":"0s"}}"#));
        let t = Timeouts::outbound(&v, "backend");
        assert_eq!((t.connect, t.request), (Some(DEFAULT_CONNECT), None));
    }

    #[test]
    fn inbound_from_mesh_under_rules() {
        let v: ProxyView = serde_json::from_str(
            r#"{"mesh":"m","dataplane":"d","inbounds":[{"port":8080,"service":"web","tags":{},
                "rules":{"MeshTimeout":{"http":{"requestTimeout":"2s"}}},
                "from":{"MeshTimeout":[
                    {"targetRef":{"kind":"Mesh"},"conf":{"idleTimeout":"5m","http":{"requestTimeout":"9s"}}},
                    {"targetRef":{"kind":"MeshService","name":"api"},"conf":{"idleTimeout":"1s"}}]}}],
              "outbounds":{}}"#,
        )
        .unwrap();
        let t = Timeouts::inbound(&v, 8080);
        assert_eq!(t.idle, Some(Duration::from_secs(300)));
        assert_eq!(t.request, Some(Duration::from_secs(2)));
    }

    #[test]
    fn inbound_rules() {
        let t = Timeouts::inbound(&view(None), 8080);
        assert_eq!(t.idle, Some(Duration::from_secs(600)));
        assert_eq!(t.request, Some(Duration::from_secs(2)));
        assert_eq!(Timeouts::inbound(&view(None), 9090), Timeouts::default());
    }

    #[tokio::test]
    async fn a_clock_is_idle_only_without_requests_or_bytes() {
        let clock = Arc::new(Clock::default());
        let idle = Duration::from_millis(200);
        let waiting = clock.request();
        let watch = tokio::spawn({
            let clock = clock.clone();
            async move { clock.idle(idle).await }
        });
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!watch.is_finished(), "idle while a request waits");
        drop(waiting);
        let released = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), watch)
            .await
            .expect("idle once the request is answered")
            .unwrap();
        // Idle counts from the answer, not from the request.
        assert!(
            released.elapsed() >= Duration::from_millis(150),
            "{:?}",
            released.elapsed()
        );
    }
}
