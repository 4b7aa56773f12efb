//! The ingress's Prometheus metrics (OpenMetrics text, `prometheus-client`).
//!
//! Traffic (all prefixed `weft_ingress_`):
//! - `connections_total{mesh, service}`: connections routed (an endpoint was picked);
//! - `active_connections{mesh, service}`;
//! - `bytes_total{mesh, service, direction}`: bytes on the downstream (other zone's) socket,
//!   `rx` read from it (the buffered ClientHello included) and `tx` written to it;
//! - `refused_total{reason}`: connections closed before routing, by reason (see
//!   [`Reason`]); every reason is present from the start, at 0;
//! - `upstream_connect_failures_total`: failed connects to local endpoints (each attempt);
//! - `passthrough_connections_total{mesh, service, zone}` (egress): connections passed,
//!   still encrypted, to another zone's ingress (`routing.zoneEgress`); their bytes and
//!   active count are in `bytes_total` and `active_connections` under the same mesh/service.
//!
//! Session: `zone_connected`, `zone_reconnects_total`, `updates_total{result="ack|nack"}`.
//!
//! A service's series are created on first use. Recording through [`Conn`] is atomics only.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why a connection was refused (closed before any byte went to a backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not TLS.
    Plaintext,
    /// TLS without a server name.
    NoSni,
    /// A server name that is not `<service>.<zone>.<mesh>.weft`.
    BadSni,
    /// A weft SNI for another zone.
    OtherZone,
    /// No such (mesh, service) in the routing table.
    UnknownService,
    /// The service is known but has no endpoints.
    NoEndpoint,
    /// A malformed or oversized ClientHello.
    BadTls,
    /// No complete ClientHello within the read deadline.
    Timeout,
    /// The client closed (or reset) before its ClientHello was complete.
    EarlyClose,
    /// Egress: MeshTrafficPermission denies the caller (also counted when an open
    /// connection is cut after a permission change).
    Denied,
    /// Egress: no certificate for the SNI's mesh yet.
    NoCertificate,
    /// Egress: the TLS handshake with the caller failed (e.g. no valid client certificate).
    Handshake,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::Plaintext,
        Reason::NoSni,
        Reason::BadSni,
        Reason::OtherZone,
        Reason::UnknownService,
        Reason::NoEndpoint,
        Reason::BadTls,
        Reason::Timeout,
        Reason::EarlyClose,
        Reason::Denied,
        Reason::NoCertificate,
        Reason::Handshake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Plaintext => "plaintext",
            Reason::NoSni => "no_sni",
            Reason::BadSni => "bad_sni",
            Reason::OtherZone => "other_zone",
            Reason::UnknownService => "unknown_service",
            Reason::NoEndpoint => "no_endpoint",
            Reason::BadTls => "bad_tls",
            Reason::Timeout => "timeout",
            Reason::EarlyClose => "early_close",
            Reason::Denied => "denied",
            Reason::NoCertificate => "no_certificate",
            Reason::Handshake => "handshake",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    mesh: String,
    service: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BytesLabels {
    mesh: String,
    service: String,
    direction: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ZoneLabels {
    mesh: String,
    service: String,
    zone: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    connections: Family<ServiceLabels, Counter>,
    active: Family<ServiceLabels, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    upstream_failures: Counter,
    passthrough: Family<ZoneLabels, Counter>,
    zone_connected: Gauge,
    reconnects: Counter,
    updates: Family<ResultLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The counters one routed connection records into, resolved once.
#[derive(Clone)]
pub struct Conn {
    pub rx: Counter,
    pub tx: Counter,
    active: Gauge,
}

/// Decrements the active gauge when the connection ends, however it ends.
pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::with_prefix("weft_ingress")
    }

    /// `weft_ingress` or, for the egress, `weft_egress`.
    pub fn with_prefix(prefix: &str) -> Metrics {
        let mut registry = Registry::with_prefix(prefix);
        let connections = Family::<ServiceLabels, Counter>::default();
        let active = Family::<ServiceLabels, Gauge>::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let refused = Family::<ReasonLabels, Counter>::default();
        let upstream_failures = Counter::default();
        let passthrough = Family::<ZoneLabels, Counter>::default();
        let zone_connected = Gauge::default();
        let reconnects = Counter::default();
        let updates = Family::<ResultLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections routed to a local service",
            connections.clone(),
        );
        registry.register(
            "active_connections",
            "Connections open now, per local service",
            active.clone(),
        );
        registry.register(
            "bytes",
            "Bytes on the other zone's side of a connection: rx read from it, tx written to it",
            bytes.clone(),
        );
        registry.register(
            "refused",
            "Connections closed before routing, by reason",
            refused.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed connection attempts to local endpoints",
            upstream_failures.clone(),
        );
        registry.register(
            "passthrough_connections",
            "Egress: connections passed through, still encrypted, to another zone's ingress",
            passthrough.clone(),
        );
        registry.register(
            "zone_connected",
            "Whether the ingress is registered with its zone on a live stream (1) or not (0)",
            zone_connected.clone(),
        );
        registry.register(
            "zone_reconnects",
            "Times the session with the zone ended and the ingress reconnected",
            reconnects.clone(),
        );
        registry.register(
            "updates",
            "Routing updates from the zone, applied (ack) or refused (nack)",
            updates.clone(),
        );
        for r in Reason::ALL {
            let _ = refused.get_or_create(&ReasonLabels { reason: r.as_str() });
        }
        for result in ["ack", "nack"] {
            let _ = updates.get_or_create(&ResultLabels { result });
        }
        Metrics {
            registry,
            connections,
            active,
            bytes,
            refused,
            upstream_failures,
            passthrough,
            zone_connected,
            reconnects,
            updates,
        }
    }

    pub fn refused(&self, reason: Reason) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn upstream_failure(&self) {
        self.upstream_failures.inc();
    }

    /// The counters of a connection to `(mesh, service)`.
    pub fn conn(&self, mesh: &str, service: &str) -> Conn {
        let labels = ServiceLabels {
            mesh: mesh.to_string(),
            service: service.to_string(),
        };
        let bytes = |direction| {
            self.bytes
                .get_or_create(&BytesLabels {
                    mesh: mesh.to_string(),
                    service: service.to_string(),
                    direction,
                })
                .clone()
        };
        Conn {
            rx: bytes("rx"),
            tx: bytes("tx"),
            active: self.active.get_or_create(&labels).clone(),
        }
    }

    /// Count a routed connection: `connections_total` and `active_connections` (until the
    /// guard drops).
    pub fn opened(&self, mesh: &str, service: &str, conn: &Conn) -> ActiveGuard {
        self.connections
            .get_or_create(&ServiceLabels {
                mesh: mesh.to_string(),
                service: service.to_string(),
            })
            .inc();
        conn.active.inc();
        ActiveGuard(conn.active.clone())
    }

    /// Count a connection passed through to `zone`'s ingress (egress), active until the
    /// guard drops.
    pub fn passed(&self, mesh: &str, service: &str, zone: &str, conn: &Conn) -> ActiveGuard {
        self.passthrough
            .get_or_create(&ZoneLabels {
                mesh: mesh.to_string(),
                service: service.to_string(),
                zone: zone.to_string(),
            })
            .inc();
        conn.active.inc();
        ActiveGuard(conn.active.clone())
    }

    pub fn set_zone_connected(&self, connected: bool) {
        self.zone_connected.set(i64::from(connected));
    }

    pub fn reconnect(&self) {
        self.reconnects.inc();
    }

    pub fn update(&self, ack: bool) {
        let result = if ack { "ack" } else { "nack" };
        self.updates.get_or_create(&ResultLabels { result }).inc();
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_from_the_start() {
        let m = Metrics::new();
        m.refused(Reason::OtherZone);
        let c = m.conn("payments", "backend");
        {
            let _g = m.opened("payments", "backend", &c);
            c.rx.inc_by(10);
            let text = m.render();
            assert!(
                text.contains(
                    "weft_ingress_active_connections{mesh=\"payments\",service=\"backend\"} 1"
                ),
                "{text}"
            );
        }
        let text = m.render();
        for r in Reason::ALL {
            assert!(
                text.contains(&format!(
                    "weft_ingress_refused_total{{reason=\"{}\"}}",
                    r.as_str()
                )),
                "{text}"
            );
        }
        assert!(text.contains("weft_ingress_refused_total{reason=\"other_zone\"} 1"));
        assert!(text.contains(
            "weft_ingress_bytes_total{mesh=\"payments\",service=\"backend\",direction=\"rx\"} 10"
        ));
        assert!(
            text.contains(
                "weft_ingress_connections_total{mesh=\"payments\",service=\"backend\"} 1"
            )
        );
        assert!(
            text.contains(
                "weft_ingress_active_connections{mesh=\"payments\",service=\"backend\"} 0"
            )
        );
        assert!(text.contains("weft_ingress_upstream_connect_failures_total 0"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
