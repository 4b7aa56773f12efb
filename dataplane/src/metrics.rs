//! The proxy's Prometheus metrics: requests, latencies, bytes, active connections, TLS
//! handshakes and certificate expiry, per inbound/outbound, labelled with service, zone and
//! mesh.
//!
//! CONTRACT (implemented by the traffic side; `admin` calls `render`).
//!
//! Recording is cheap: a listener resolves its [`ServiceMetrics`] once ([`Metrics::service`])
//! and records through it (atomics, no label building). A service's series are created on
//! its first recording, never eagerly: an idle proxy with a thousand outbounds holds none.
//! `mesh` and `zone` are not part of the stored series; [`render`](Metrics::render) adds them
//! from the current [`Labels`] ([`Metrics::set_labels`] may change them at any time).
//!
//! Series (all prefixed `weft_dp_`):
//! - `requests_total{direction, service, code_class}` (`2xx`, `5xx`, ...), HTTP only;
//! - `request_duration_seconds{direction, service}` histogram, to the response head;
//! - `bytes_total{direction, service, flow}`: bytes on the downstream socket, `rx` read
//!   from it and `tx` written to it (TLS records included);
//! - `active_connections{direction, service}`;
//! - `tls_handshakes_total{direction, result}` (`ok`, `failed`);
//! - `authz_denied_total{direction, service, source}` (inbound: MeshTrafficPermission);
//! - `certificate_expiry_timestamp_seconds`: the workload certificate's `notAfter`;
//! - `dns_queries_total{result}` (`vip`, `nodata`, `nxdomain`, `forwarded`, `servfail`,
//!   `formerr`): the embedded DNS server's answers (`--dns-address`);
//! - `vip_listeners`, `vip_bind_failures_total`: VIP outbound listeners (`--bind-vips`);
//! - `transparent_connections_total{result}` (`vip`, `unknown`, `not_redirected`):
//!   connections redirected to the transparent outbound (`--transparent-outbound-port`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::state::Labels;
use crate::timeouts::Clock;
use crate::tls::Identity;

/// The content type of [`Metrics::render`]'s output (OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets, seconds: 0.25 ms to ~16 s.
const BUCKETS: [f64; 17] = [
    0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
    2.048, 4.096, 8.192, 16.384,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    direction: &'static str,
    service: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    service: String,
    code_class: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BytesLabels {
    direction: &'static str,
    service: String,
    flow: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandshakeLabels {
    direction: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeniedLabels {
    direction: &'static str,
    service: String,
    source: String,
}

type HistogramFamily = Family<ServiceLabels, Histogram, fn() -> Histogram>;

fn new_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

#[derive(Clone)]
struct Families {
    requests: Family<RequestLabels, Counter>,
    durations: HistogramFamily,
    bytes: Family<BytesLabels, Counter>,
    active: Family<ServiceLabels, Gauge>,
    handshakes: Family<HandshakeLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
    dns: Family<ResultLabels, Counter>,
    vip_listeners: Gauge,
    vip_bind_failures: Counter,
    transparent: Family<ResultLabels, Counter>,
}

pub struct Metrics {
    labels: RwLock<Labels>,
    families: Families,
    /// `[inbound, outbound]` handshake counters: `(ok, failed)`.
    handshakes: [(OnceLock<Counter>, OnceLock<Counter>); 2],
    /// Per direction, per service.
    services: [Mutex<HashMap<String, Arc<ServiceMetrics>>>; 2],
}

impl Metrics {
    pub fn new(labels: Labels) -> Metrics {
        Metrics {
            labels: RwLock::new(labels),
            families: Families {
                requests: Family::default(),
                durations: Family::new_with_constructor(new_histogram),
                bytes: Family::default(),
                active: Family::default(),
                handshakes: Family::default(),
                denied: Family::default(),
                dns: Family::default(),
                vip_listeners: Gauge::default(),
                vip_bind_failures: Counter::default(),
                transparent: Family::default(),
            },
            handshakes: Default::default(),
            services: Default::default(),
        }
    }

    /// Change the labels every series carries (e.g. once the zone is known).
    pub fn set_labels(&self, labels: Labels) {
        *self.labels.write().unwrap_or_else(|e| e.into_inner()) = labels;
    }

    /// The recording handle of one service in one direction; the same handle for the same
    /// pair. Resolve it once per listener (or per connection), not per request.
    pub fn service(&self, direction: Direction, service: &str) -> Arc<ServiceMetrics> {
        let mut map = self.services[direction as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(service) {
            return s.clone();
        }
        let s = Arc::new(ServiceMetrics {
            direction,
            service: service.to_string(),
            families: self.families.clone(),
            codes: Default::default(),
            duration: OnceLock::new(),
            rx: OnceLock::new(),
            tx: OnceLock::new(),
            active: OnceLock::new(),
        });
        map.insert(service.to_string(), s.clone());
        s
    }

    /// One TLS handshake, accepted (inbound) or originated (outbound).
    pub fn tls_handshake(&self, direction: Direction, ok: bool) {
        let (o, f) = &self.handshakes[direction as usize];
        let (cell, result) = if ok { (o, "ok") } else { (f, "failed") };
        cell.get_or_init(|| {
            self.families
                .handshakes
                .get_or_create_owned(&HandshakeLabels {
                    direction: direction.as_str(),
                    result,
                })
        })
        .inc();
    }

    /// One DNS query answered (`vip`, `nodata`, `nxdomain`, `forwarded`, `servfail`,
    /// `formerr`).
    pub fn dns_query(&self, result: &'static str) {
        self.families
            .dns
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// VIP listeners bound now.
    pub fn set_vip_listeners(&self, n: usize) {
        self.families.vip_listeners.set(n as i64);
    }

    /// A VIP listener that could not bind.
    pub fn vip_bind_failed(&self) {
        self.families.vip_bind_failures.inc();
    }

    /// One connection taken by the transparent outbound: handed to a VIP's outbound (`vip`),
    /// closed for an original destination that is no VIP:port (`unknown`) or for none
    /// (`not_redirected`).
    pub fn transparent_connection(&self, result: &'static str) {
        self.families
            .transparent
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The Prometheus text exposition of everything, including `identity`'s certificate
    /// expiry.
    pub fn render(&self, identity: &Identity) -> String {
        let labels = self
            .labels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut r = Registry::with_prefix_and_labels(
            "weft_dp",
            [
                (Cow::Borrowed("mesh"), Cow::Owned(labels.mesh)),
                (Cow::Borrowed("zone"), Cow::Owned(labels.zone)),
            ]
            .into_iter(),
        );
        let f = self.families.clone();
        r.register(
            "requests",
            "HTTP requests by response status class",
            f.requests,
        );
        r.register_with_unit(
            "request_duration",
            "Time from request to response head",
            Unit::Seconds,
            f.durations,
        );
        r.register(
            "bytes",
            "Bytes read from (rx) and written to (tx) the downstream socket",
            f.bytes,
        );
        r.register("active_connections", "Open connections", f.active);
        r.register("tls_handshakes", "TLS handshakes by result", f.handshakes);
        r.register(
            "authz_denied",
            "Requests and connections denied by MeshTrafficPermission",
            f.denied,
        );
        r.register(
            "dns_queries",
            "DNS queries answered by the embedded server, by result",
            f.dns,
        );
        r.register(
            "vip_listeners",
            "VIP outbound listeners bound (--bind-vips)",
            f.vip_listeners,
        );
        r.register(
            "vip_bind_failures",
            "VIP outbound listeners that could not bind",
            f.vip_bind_failures,
        );
        r.register(
            "transparent_connections",
            "Connections redirected to the transparent outbound, by result",
            f.transparent,
        );
        if let Some(status) = identity.status() {
            let expiry: Gauge = Gauge::default();
            let secs = status
                .not_after
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            expiry.set(secs);
            r.register(
                "certificate_expiry_timestamp_seconds",
                "When the workload certificate expires (Unix time)",
                expiry,
            );
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The recording handle of one service in one direction. Every series is created on its
/// first use.
pub struct ServiceMetrics {
    direction: Direction,
    service: String,
    families: Families,
    codes: [OnceLock<Counter>; 6],
    duration: OnceLock<Histogram>,
    rx: OnceLock<Counter>,
    tx: OnceLock<Counter>,
    active: OnceLock<Gauge>,
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

impl ServiceMetrics {
    pub fn direction(&self) -> Direction {
        self.direction
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    fn labels(&self) -> ServiceLabels {
        ServiceLabels {
            direction: self.direction.as_str(),
            service: self.service.clone(),
        }
    }

    /// One HTTP request answered with `status` (the proxy's own answers included) after
    /// `elapsed`.
    pub fn request(&self, status: u16, elapsed: Duration) {
        let i = match status {
            100..=599 => (status / 100 - 1) as usize,
            _ => 5,
        };
        self.codes[i]
            .get_or_init(|| {
                self.families.requests.get_or_create_owned(&RequestLabels {
                    direction: self.direction.as_str(),
                    service: self.service.clone(),
                    code_class: CLASSES[i],
                })
            })
            .inc();
        self.duration
            .get_or_init(|| self.families.durations.get_or_create_owned(&self.labels()))
            .observe(elapsed.as_secs_f64());
    }

    fn bytes<'a>(&'a self, cell: &'a OnceLock<Counter>, flow: &'static str) -> &'a Counter {
        cell.get_or_init(|| {
            self.families.bytes.get_or_create_owned(&BytesLabels {
                direction: self.direction.as_str(),
                service: self.service.clone(),
                flow,
            })
        })
    }

    /// Bytes read from the downstream.
    pub fn rx(&self, n: u64) {
        self.bytes(&self.rx, "rx").inc_by(n);
    }

    /// Bytes written to the downstream.
    pub fn tx(&self, n: u64) {
        self.bytes(&self.tx, "tx").inc_by(n);
    }

    /// Count a connection as active until the guard is dropped.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.active_gauge().inc();
        ConnectionGuard(self.clone())
    }

    fn active_gauge(&self) -> &Gauge {
        self.active
            .get_or_init(|| self.families.active.get_or_create_owned(&self.labels()))
    }

    /// A request or connection from `source` refused by MeshTrafficPermission (cold path).
    pub fn authz_denied(&self, source: &str) {
        self.families
            .denied
            .get_or_create(&DeniedLabels {
                direction: self.direction.as_str(),
                service: self.service.clone(),
                source: source.to_string(),
            })
            .inc();
    }
}

/// Holds one active connection of a service; see [`ServiceMetrics::connection`].
pub struct ConnectionGuard(Arc<ServiceMetrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.active_gauge().dec();
    }
}

/// An I/O stream that counts the bytes read (`rx`) and written (`tx`) into a service's
/// `bytes_total`. Wrap the downstream socket (under TLS, to count what goes on the wire).
/// With [`Counted::watch`], it also tells an idle-timeout [`Clock`] about every byte: on a
/// proxied connection every byte of either direction goes through the downstream socket.
pub struct Counted<S> {
    inner: S,
    metrics: Arc<ServiceMetrics>,
    clock: Option<Arc<Clock>>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, metrics: Arc<ServiceMetrics>) -> Counted<S> {
        Counted {
            inner,
            metrics,
            clock: None,
        }
    }

    /// Report this stream's activity to `clock` (MeshTimeout `idleTimeout`).
    pub fn watch(&mut self, clock: Arc<Clock>) {
        self.clock = Some(clock);
    }

    fn touch(&self) {
        if let Some(c) = &self.clock {
            c.touch();
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.metrics.rx(n as u64);
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.metrics.tx(n as u64);
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.metrics.tx(n as u64);
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Labels {
        Labels {
            mesh: "default".into(),
            zone: String::new(),
            dataplane: "web-1".into(),
        }
    }

    #[test]
    fn nothing_per_service_until_used() {
        let m = Metrics::new(labels());
        let _handles: Vec<_> = (0..1000)
            .map(|i| m.service(Direction::Outbound, &format!("svc-{i}")))
            .collect();
        let out = m.render(&Identity::new("default"));
        assert!(!out.contains("svc-"), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
    }

    #[test]
    fn render_has_labels_and_series() {
        let m = Metrics::new(labels());
        let s = m.service(Direction::Inbound, "backend");
        assert!(Arc::ptr_eq(&s, &m.service(Direction::Inbound, "backend")));
        s.request(200, Duration::from_millis(3));
        s.request(503, Duration::from_millis(1));
        s.rx(10);
        s.tx(20);
        let guard = s.connection();
        m.tls_handshake(Direction::Inbound, false);
        s.authz_denied("web");
        m.set_labels(Labels {
            zone: "east".into(),
            ..labels()
        });
        let out = m.render(&Identity::new("default"));
        for want in [
            r#"weft_dp_requests_total{mesh="default",zone="east",direction="inbound",service="backend",code_class="2xx"} 1"#,
            r#"weft_dp_requests_total{mesh="default",zone="east",direction="inbound",service="backend",code_class="5xx"} 1"#,
            r#"weft_dp_request_duration_seconds_count{mesh="default",zone="east",direction="inbound",service="backend"} 2"#,
            r#"weft_dp_bytes_total{mesh="default",zone="east",direction="inbound",service="backend",flow="rx"} 10"#,
            r#"weft_dp_bytes_total{mesh="default",zone="east",direction="inbound",service="backend",flow="tx"} 20"#,
            r#"weft_dp_active_connections{mesh="default",zone="east",direction="inbound",service="backend"} 1"#,
            r#"weft_dp_tls_handshakes_total{mesh="default",zone="east",direction="inbound",result="failed"} 1"#,
            r#"weft_dp_authz_denied_total{mesh="default",zone="east",direction="inbound",service="backend",source="web"} 1"#,
        ] {
            assert!(out.contains(want), "missing {want} in\n{out}");
        }
        drop(guard);
        let out = m.render(&Identity::new("default"));
        assert!(out.contains(r#"weft_dp_active_connections{mesh="default",zone="east",direction="inbound",service="backend"} 0"#), "{out}");
    }
}
