//! The configuration (`default`) of every policy kind that uses the shared [`PolicySpec`]
//! shape, with the table of where each may appear ([`Sections`]). Shapes follow Kuma's
//! targetRef-based policies. Routes have their own shape: see `route.rs`.
//!
//! [`PolicySpec`]: super::PolicySpec

use std::collections::HashSet;

use serde::{Deserialize, Deserializer, Serialize};

use super::Spec;
use super::fields::{
    Address, Header, Percent, StatusCode, at_least_one, check_endpoint, check_header_name,
    check_host_port, check_http_url, check_union, exactly_one, index, non_empty, nonzero, positive,
};
use super::policy::{Conf, Sections, allow};
use crate::validate::{Duration, Invalid, Name, Port, join};

/// An object with no fields (`roundRobin: {}`), kept so Kuma documents parse as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

// ---------------------------------------------------------------------------------------------
// MeshTrafficPermission

/// Who may call the targeted proxies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshTrafficPermissionConf {
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
    /// Allow, but log what `Deny` would have refused.
    AllowWithShadowDeny,
}

impl Spec for MeshTrafficPermissionConf {}

impl Conf for MeshTrafficPermissionConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP_WITH_EXTERNAL,
        to: allow::NONE,
        from: allow::FROM,
        rules: true,
        default: false,
    };
}

// ---------------------------------------------------------------------------------------------
// MeshTimeout

/// MeshTimeout configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshTimeoutConf {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<MeshTimeoutHttp>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshTimeoutHttp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stream_duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers_timeout: Option<Duration>,
}

impl Spec for MeshTimeoutConf {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        // A zero timeout means "no timeout" (as in Envoy), so zero is allowed.
        at_least_one(
            path,
            &[
                ("connectionTimeout", self.connection_timeout.is_some()),
                ("idleTimeout", self.idle_timeout.is_some()),
                ("http", self.http.is_some()),
            ],
            errs,
        );
    }
}

impl Conf for MeshTimeoutConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP_WITH_ROUTE,
        to: allow::TO,
        from: allow::FROM,
        rules: true,
        default: false,
    };
}

// ---------------------------------------------------------------------------------------------
// MeshRetry

/// How outbound requests are retried.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshRetryConf {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<RetryTcp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<RetryHttp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<RetryGrpc>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryTcp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connect_attempt: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryHttp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_off: Option<BackOff>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<HttpRetryOn>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryGrpc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_off: Option<BackOff>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<GrpcRetryOn>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackOff {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<Duration>,
}

/// An HTTP retry condition: a named condition (`5xx`, `ConnectFailure`, ...) or a status
/// code (`503`, written as a number or a string). Kept as a string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct HttpRetryOn(pub String);

impl HttpRetryOn {
    pub const CONDITIONS: &[&str] = &[
        "All",
        "5xx",
        "GatewayError",
        "Reset",
        "Retriable4xx",
        "ConnectFailure",
        "EnvoyRatelimited",
        "RefusedStream",
        "Http3PostConnectFailure",
        "HttpMethodConnect",
        "HttpMethodDelete",
        "HttpMethodGet",
        "HttpMethodHead",
        "HttpMethodOptions",
        "HttpMethodPatch",
        "HttpMethodPost",
        "HttpMethodPut",
        "HttpMethodTrace",
    ];
}

impl<'de> Deserialize<'de> for HttpRetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let s = match &v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        let status = s.len() == 3 && s.parse::<u16>().is_ok_and(|n| (100..=599).contains(&n));
        if status || HttpRetryOn::CONDITIONS.contains(&s.as_str()) {
            Ok(HttpRetryOn(s))
        } else {
            Err(serde::de::Error::custom(format!(
                "invalid retry condition {v} (expected an HTTP status such as 503, or one of {})",
                HttpRetryOn::CONDITIONS.join(", ")
            )))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GrpcRetryOn {
    Canceled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

impl BackOff {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        positive(path, "baseInterval", self.base_interval, errs);
        positive(path, "maxInterval", self.max_interval, errs);
        if let (Some(base), Some(max)) = (self.base_interval, self.max_interval)
            && max < base
        {
            errs.add(
                join(path, "maxInterval"),
                format!("must be at least baseInterval ({base}); raise maxInterval or lower baseInterval"),
            );
        }
    }
}

impl Spec for MeshRetryConf {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        at_least_one(
            path,
            &[
                ("tcp", self.tcp.is_some()),
                ("http", self.http.is_some()),
                ("grpc", self.grpc.is_some()),
            ],
            errs,
        );
        if let Some(tcp) = &self.tcp {
            nonzero(
                &join(path, "tcp"),
                "maxConnectAttempt",
                tcp.max_connect_attempt,
                errs,
            );
        }
        if let Some(http) = &self.http {
            let p = join(path, "http");
            positive(&p, "perTryTimeout", http.per_try_timeout, errs);
            if let Some(b) = &http.back_off {
                b.validate(&join(&p, "backOff"), errs);
            }
        }
        if let Some(grpc) = &self.grpc {
            let p = join(path, "grpc");
            positive(&p, "perTryTimeout", grpc.per_try_timeout, errs);
            if let Some(b) = &grpc.back_off {
                b.validate(&join(&p, "backOff"), errs);
            }
        }
    }
}

impl Conf for MeshRetryConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP_WITH_ROUTE,
        to: allow::TO,
        from: allow::NONE,
        rules: false,
        default: false,
    };
}

// ---------------------------------------------------------------------------------------------
// MeshCircuitBreaker

/// Connection limits and outlier detection for a destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshCircuitBreakerConf {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    /// Most endpoints that may be ejected at once, a percentage (0-100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detectors: Option<Detectors>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Detectors {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_failures: Option<Consecutive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_failures: Option<Consecutive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_origin_failures: Option<Consecutive>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Consecutive {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive: Option<u32>,
}

impl Spec for MeshCircuitBreakerConf {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        at_least_one(
            path,
            &[
                ("connectionLimits", self.connection_limits.is_some()),
                ("outlierDetection", self.outlier_detection.is_some()),
            ],
            errs,
        );
        if let Some(l) = &self.connection_limits {
            let p = join(path, "connectionLimits");
            nonzero(&p, "maxConnections", l.max_connections, errs);
            nonzero(&p, "maxPendingRequests", l.max_pending_requests, errs);
            nonzero(&p, "maxRequests", l.max_requests, errs);
            nonzero(&p, "maxRetries", l.max_retries, errs);
        }
        if let Some(o) = &self.outlier_detection {
            let p = join(path, "outlierDetection");
            positive(&p, "interval", o.interval, errs);
            positive(&p, "baseEjectionTime", o.base_ejection_time, errs);
            if let Some(n) = o.max_ejection_percent
                && n > 100
            {
                errs.add(
                    join(&p, "maxEjectionPercent"),
                    format!("must be 0-100 (a percentage), got {n}"),
                );
            }
            match &o.detectors {
                None if o.disabled != Some(true) => errs.add(
                    join(&p, "detectors"),
                    "required unless disabled is true (e.g. detectors: {totalFailures: {consecutive: 5}})",
                ),
                None => {}
                Some(d) => {
                    let p = join(&p, "detectors");
                    let all = [
                        ("totalFailures", &d.total_failures),
                        ("gatewayFailures", &d.gateway_failures),
                        ("localOriginFailures", &d.local_origin_failures),
                    ];
                    at_least_one(&p, &all.map(|(name, d)| (name, d.is_some())), errs);
                    for (name, d) in all {
                        if let Some(d) = d {
                            nonzero(&join(&p, name), "consecutive", d.consecutive, errs);
                        }
                    }
                }
            }
        }
    }
}

impl Conf for MeshCircuitBreakerConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP,
        to: allow::TO,
        from: allow::MESH,
        rules: false,
        default: false,
    };
}

// ---------------------------------------------------------------------------------------------
// MeshHealthCheck

/// Active health checking of a destination's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshHealthCheckConf {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HealthCheckHttp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<HealthCheckTcp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<HealthCheckGrpc>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckHttp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<StatusCode>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckTcp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// Bytes to send, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    /// Bytes expected back, base64.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub receive: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckGrpc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

impl Spec for MeshHealthCheckConf {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        positive(path, "interval", self.interval, errs);
        positive(path, "timeout", self.timeout, errs);
        nonzero(path, "unhealthyThreshold", self.unhealthy_threshold, errs);
        nonzero(path, "healthyThreshold", self.healthy_threshold, errs);
        if let Some(http) = &self.http
            && let Some(p) = &http.path
            && !p.starts_with('/')
        {
            errs.add(
                join(path, "http.path"),
                format!("must start with / (e.g. /health), got {p:?}"),
            );
        }
    }
}

impl Conf for MeshHealthCheckConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP,
        to: allow::TO_SERVICE,
        from: allow::NONE,
        rules: false,
        default: false,
    };
}

// ---------------------------------------------------------------------------------------------
// MeshRateLimit

/// Local (per-proxy) rate limiting of inbound traffic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshRateLimitConf {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalRateLimit>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<LocalHttpRateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<LocalTcpRateLimit>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalHttpRateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_rate: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_rate_limit: Option<OnRateLimit>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalTcpRateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_rate: Option<Rate>,
}

/// `num` requests (or connections) per `interval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rate {
    pub num: u32,
    pub interval: Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnRateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<HeaderChanges>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderChanges {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Header>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<Header>,
}

impl Rate {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        if self.num == 0 {
            errs.add(join(path, "num"), "must be greater than 0");
        }
        // Envoy's token bucket refills at most every 50ms.
        if self.interval.as_std() < std::time::Duration::from_millis(50) {
            errs.add(
                join(path, "interval"),
                format!("must be at least 50ms, got {}", self.interval),
            );
        }
    }
}

impl Spec for MeshRateLimitConf {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        let Some(local) = &self.local else {
            errs.add(
                join(path, "local"),
                "required (e.g. local: {http: {requestRate: {num: 100, interval: 1s}}})",
            );
            return;
        };
        let p = join(path, "local");
        at_least_one(
            &p,
            &[("http", local.http.is_some()), ("tcp", local.tcp.is_some())],
            errs,
        );
        if let Some(http) = &local.http {
            let p = join(&p, "http");
            at_least_one(
                &p,
                &[
                    ("disabled", http.disabled.is_some()),
                    ("requestRate", http.request_rate.is_some()),
                    ("onRateLimit", http.on_rate_limit.is_some()),
                ],
                errs,
            );
            if let Some(r) = &http.request_rate {
                r.validate(&join(&p, "requestRate"), errs);
            }
            if let Some(h) = http.on_rate_limit.as_ref().and_then(|o| o.headers.as_ref()) {
                let p = join(&p, "onRateLimit.headers");
                for (i, h) in h.add.iter().enumerate() {
                    h.validate(&index(&p, "add", i), errs);
                }
                for (i, h) in h.set.iter().enumerate() {
                    h.validate(&index(&p, "set", i), errs);
                }
            }
        }
        if let Some(tcp) = &local.tcp {
            let p = join(&p, "tcp");
            at_least_one(
                &p,
                &[
                    ("disabled", tcp.disabled.is_some()),
                    ("connectionRate", tcp.connection_rate.is_some()),
                ],
                errs,
            );
            if let Some(r) = &tcp.connection_rate {
                r.validate(&join(&p, "connectionRate"), errs);
            }
        }
    }
}

impl Conf for MeshRateLimitConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP_WITH_ROUTE,
        to: allow::NONE,
        from: allow::MESH,
        rules: true,
        default: false,
    };
}

// ---------------------------------------------------------------------------------------------
// MeshFaultInjection

/// Faults injected into HTTP traffic, for testing resilience.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshFaultInjectionConf {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<Fault>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_bandwidth: Option<ResponseBandwidth>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Abort {
    pub http_status: StatusCode,
    pub percentage: Percent,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delay {
    pub value: Duration,
    pub percentage: Percent,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResponseBandwidth {
    /// e.g. `10kbps`, `5Mbps`, `1Gbps`.
    pub limit: String,
    pub percentage: Percent,
}

fn check_bandwidth(s: &str) -> Result<(), String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let ok = digits > 0 && ["bps", "kbps", "Mbps", "Gbps"].contains(&&s[digits..]);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid bandwidth {s:?} (expected a whole number and kbps, Mbps or Gbps, e.g. 50kbps)"
        ))
    }
}

impl Spec for MeshFaultInjectionConf {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        non_empty(
            path,
            "http",
            &self.http,
            "http: [{abort: {httpStatus: 503, percentage: 10}}]",
            errs,
        );
        for (i, f) in self.http.iter().enumerate() {
            let p = index(path, "http", i);
            at_least_one(
                &p,
                &[
                    ("abort", f.abort.is_some()),
                    ("delay", f.delay.is_some()),
                    ("responseBandwidth", f.response_bandwidth.is_some()),
                ],
                errs,
            );
            if let Some(b) = &f.response_bandwidth
                && let Err(m) = check_bandwidth(&b.limit)
            {
                errs.add(join(&p, "responseBandwidth.limit"), m);
            }
        }
    }
}

impl Conf for MeshFaultInjectionConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP,
        to: allow::TO_SERVICE,
        from: allow::FROM,
        rules: false,
        default: false,
    };
}

// ---------------------------------------------------------------------------------------------
// MeshLoadBalancingStrategy

/// How a destination's endpoints are chosen: the algorithm and locality awareness.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshLoadBalancingStrategyConf {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_awareness: Option<LocalityAwareness>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityAwareness {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_zone: Option<LocalZone>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_zone: Option<CrossZone>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalZone {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity_tags: Vec<AffinityTag>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AffinityTag {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CrossZone {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<Failover>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_threshold: Option<FailoverThreshold>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Failover {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<FromZones>,
    pub to: ToZones,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromZones {
    pub zones: Vec<Name>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToZones {
    #[serde(rename = "type")]
    pub kind: ToZonesType,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<Name>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ToZonesType {
    None,
    Only,
    Any,
    AnyExcept,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailoverThreshold {
    pub percentage: Percent,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    #[serde(rename = "type")]
    pub kind: LoadBalancerType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_robin: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub least_request: Option<LeastRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<RingHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev: Option<Maglev>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LoadBalancerType {
    RoundRobin,
    LeastRequest,
    RingHash,
    Random,
    Maglev,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeastRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choice_count: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingHash {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_function: Option<HashFunction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ring_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ring_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hash_policies: Vec<HashPolicy>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashFunction {
    XXHash,
    MurmurHash2,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Maglev {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hash_policies: Vec<HashPolicy>,
}

/// What a consistent-hash balancer hashes on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashPolicy {
    #[serde(rename = "type")]
    pub kind: HashPolicyType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<NamedKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<CookieHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_parameter: Option<NamedKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_state: Option<FilterStateHash>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashPolicyType {
    Header,
    Cookie,
    Connection,
    QueryParameter,
    FilterState,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamedKey {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieHash {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionHash {
    #[serde(rename = "sourceIP", default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterStateHash {
    pub key: String,
}

const MAX_RING_SIZE: u32 = 8_000_000;
const MAX_MAGLEV_TABLE: u32 = 5_000_011;

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

impl HashPolicy {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        let (ty, field) = match self.kind {
            HashPolicyType::Header => ("Header", "header"),
            HashPolicyType::Cookie => ("Cookie", "cookie"),
            HashPolicyType::Connection => ("Connection", "connection"),
            HashPolicyType::QueryParameter => ("QueryParameter", "queryParameter"),
            HashPolicyType::FilterState => ("FilterState", "filterState"),
        };
        let fields = [
            ("header", self.header.is_some()),
            ("cookie", self.cookie.is_some()),
            ("connection", self.connection.is_some()),
            ("queryParameter", self.query_parameter.is_some()),
            ("filterState", self.filter_state.is_some()),
        ];
        check_union(path, ty, field, true, &fields, errs);
        if let Some(h) = &self.header
            && let Err(m) = check_header_name(&h.name)
        {
            errs.add(join(path, "header.name"), m);
        }
        for (field, name) in [
            ("cookie.name", self.cookie.as_ref().map(|c| &c.name)),
            (
                "queryParameter.name",
                self.query_parameter.as_ref().map(|q| &q.name),
            ),
            (
                "filterState.key",
                self.filter_state.as_ref().map(|f| &f.key),
            ),
        ] {
            if name.is_some_and(|n| n.is_empty()) {
                errs.add(join(path, field), "must not be empty");
            }
        }
    }
}

impl LoadBalancer {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        let (ty, field) = match self.kind {
            LoadBalancerType::RoundRobin => ("RoundRobin", "roundRobin"),
            LoadBalancerType::LeastRequest => ("LeastRequest", "leastRequest"),
            LoadBalancerType::RingHash => ("RingHash", "ringHash"),
            LoadBalancerType::Random => ("Random", "random"),
            LoadBalancerType::Maglev => ("Maglev", "maglev"),
        };
        let fields = [
            ("roundRobin", self.round_robin.is_some()),
            ("leastRequest", self.least_request.is_some()),
            ("ringHash", self.ring_hash.is_some()),
            ("random", self.random.is_some()),
            ("maglev", self.maglev.is_some()),
        ];
        // Every algorithm has defaults, so its settings object is optional.
        check_union(path, ty, field, false, &fields, errs);
        if let Some(n) = self.least_request.as_ref().and_then(|l| l.choice_count)
            && n < 2
        {
            errs.add(
                join(path, "leastRequest.choiceCount"),
                format!("must be at least 2, got {n}"),
            );
        }
        if let Some(r) = &self.ring_hash {
            let p = join(path, "ringHash");
            for (field, size) in [
                ("minRingSize", r.min_ring_size),
                ("maxRingSize", r.max_ring_size),
            ] {
                if let Some(n) = size
                    && !(1..=MAX_RING_SIZE).contains(&n)
                {
                    errs.add(
                        join(&p, field),
                        format!("must be 1-{MAX_RING_SIZE}, got {n}"),
                    );
                }
            }
            if let (Some(min), Some(max)) = (r.min_ring_size, r.max_ring_size)
                && min > max
            {
                errs.add(
                    join(&p, "minRingSize"),
                    format!("must not exceed maxRingSize ({max})"),
                );
            }
            for (i, h) in r.hash_policies.iter().enumerate() {
                h.validate(&index(&p, "hashPolicies", i), errs);
            }
        }
        if let Some(m) = &self.maglev {
            let p = join(path, "maglev");
            if let Some(n) = m.table_size
                && (n > MAX_MAGLEV_TABLE || !is_prime(n))
            {
                errs.add(
                    join(&p, "tableSize"),
                    format!(
                        "must be a prime number up to {MAX_MAGLEV_TABLE} (e.g. 65537), got {n}"
                    ),
                );
            }
            for (i, h) in m.hash_policies.iter().enumerate() {
                h.validate(&index(&p, "hashPolicies", i), errs);
            }
        }
    }
}

impl LocalityAwareness {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        if let Some(z) = &self.local_zone {
            let p = join(path, "localZone");
            let weighted = z
                .affinity_tags
                .iter()
                .filter(|t| t.weight.is_some())
                .count();
            if weighted != 0 && weighted != z.affinity_tags.len() {
                errs.add(
                    join(&p, "affinityTags"),
                    "set weight on every affinity tag or on none (unset weights are computed from the order)",
                );
            }
            for (i, t) in z.affinity_tags.iter().enumerate() {
                if t.key.is_empty() {
                    errs.add(
                        join(&index(&p, "affinityTags", i), "key"),
                        "must not be empty (e.g. k8s.io/node)",
                    );
                }
            }
        }
        if let Some(c) = &self.cross_zone {
            let p = join(path, "crossZone");
            for (i, f) in c.failover.iter().enumerate() {
                let p = join(&index(&p, "failover", i), "to");
                match (f.to.kind, f.to.zones.is_empty()) {
                    (ToZonesType::Only | ToZonesType::AnyExcept, true) => errs.add(
                        join(&p, "zones"),
                        format!("required with type {:?} (list the zones)", f.to.kind),
                    ),
                    (ToZonesType::None | ToZonesType::Any, false) => errs.add(
                        join(&p, "zones"),
                        format!(
                            "not allowed with type {:?} (remove it, or use Only or AnyExcept)",
                            f.to.kind
                        ),
                    ),
                    _ => {}
                }
            }
        }
    }
}

impl Spec for MeshLoadBalancingStrategyConf {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        at_least_one(
            path,
            &[
                ("localityAwareness", self.locality_awareness.is_some()),
                ("loadBalancer", self.load_balancer.is_some()),
            ],
            errs,
        );
        if let Some(l) = &self.locality_awareness {
            l.validate(&join(path, "localityAwareness"), errs);
        }
        if let Some(lb) = &self.load_balancer {
            lb.validate(&join(path, "loadBalancer"), errs);
        }
    }
}

impl Conf for MeshLoadBalancingStrategyConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP,
        to: allow::TO_SERVICE,
        from: allow::NONE,
        rules: false,
        default: false,
    };
}

// ---------------------------------------------------------------------------------------------
// MeshAccessLog

/// Where and how requests and connections are logged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshAccessLogConf {
    #[serde(default)]
    pub backends: Vec<AccessLogBackend>,
}

/// One of `file`, `tcp`, `openTelemetry`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogBackend {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_telemetry: Option<OtelLogBackend>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileBackend {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormat>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpBackend {
    /// `host:port` of the collector.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormat>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtelLogBackend {
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogFormat {
    #[serde(rename = "type")]
    pub kind: LogFormatType,
    /// Envoy format string, for `Plain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain: Option<String>,
    /// Key and Envoy format string pairs, for `Json`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub json: Vec<KeyValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omit_empty_values: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LogFormatType {
    Plain,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

impl LogFormat {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        match self.kind {
            LogFormatType::Plain => {
                if self.plain.is_none() {
                    errs.add(join(path, "plain"), "required with type Plain (e.g. plain: '%START_TIME% %KUMA_SOURCE_SERVICE%')");
                }
                if !self.json.is_empty() {
                    errs.add(
                        join(path, "json"),
                        "not allowed with type Plain (remove it, or change type to Json)",
                    );
                }
            }
            LogFormatType::Json => {
                if self.json.is_empty() {
                    errs.add(join(path, "json"), "required with type Json (e.g. json: [{key: start, value: '%START_TIME%'}])");
                }
                if self.plain.is_some() {
                    errs.add(
                        join(path, "plain"),
                        "not allowed with type Json (remove it, or change type to Plain)",
                    );
                }
            }
        }
    }
}

impl Spec for MeshAccessLogConf {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        non_empty(
            path,
            "backends",
            &self.backends,
            "backends: [{file: {path: /dev/stdout}}]",
            errs,
        );
        for (i, b) in self.backends.iter().enumerate() {
            let p = index(path, "backends", i);
            exactly_one(
                &p,
                &[
                    ("file", b.file.is_some()),
                    ("tcp", b.tcp.is_some()),
                    ("openTelemetry", b.open_telemetry.is_some()),
                ],
                errs,
            );
            if let Some(f) = &b.file {
                if !f.path.starts_with('/') {
                    errs.add(
                        join(&p, "file.path"),
                        format!(
                            "must be an absolute path (e.g. /dev/stdout), got {:?}",
                            f.path
                        ),
                    );
                }
                if let Some(fmt) = &f.format {
                    fmt.validate(&join(&p, "file.format"), errs);
                }
            }
            if let Some(t) = &b.tcp {
                if let Err(m) = check_host_port(&t.address) {
                    errs.add(join(&p, "tcp.address"), m);
                }
                if let Some(fmt) = &t.format {
                    fmt.validate(&join(&p, "tcp.format"), errs);
                }
            }
            if let Some(o) = &b.open_telemetry
                && let Err(m) = check_endpoint(&o.endpoint)
            {
                errs.add(join(&p, "openTelemetry.endpoint"), m);
            }
        }
    }
}

impl Conf for MeshAccessLogConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP,
        to: allow::TO,
        from: allow::MESH,
        rules: false,
        default: false,
    };
}

// ---------------------------------------------------------------------------------------------
// MeshTrace

/// Request tracing: where spans go, how many requests are sampled, extra tags.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshTraceConf {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<TraceBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Sampling>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<TraceTag>,
}

/// One of `zipkin`, `openTelemetry`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceBackend {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zipkin: Option<ZipkinBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_telemetry: Option<OtelTraceBackend>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZipkinBackend {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id128bit: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<ZipkinApiVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_span_context: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ZipkinApiVersion {
    HttpJson,
    HttpProto,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtelTraceBackend {
    pub endpoint: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sampling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overall: Option<Percent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<Percent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random: Option<Percent>,
}

/// A span tag from a literal or a request header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceTag {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub literal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderTag>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderTag {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

impl Spec for MeshTraceConf {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        // A proxy sends spans to one place (as in Kuma): the list exists for future use.
        if self.backends.len() > 1 {
            errs.add(
                join(path, "backends"),
                format!("at most one backend allowed, got {}", self.backends.len()),
            );
        }
        for (i, b) in self.backends.iter().enumerate() {
            let p = index(path, "backends", i);
            exactly_one(
                &p,
                &[
                    ("zipkin", b.zipkin.is_some()),
                    ("openTelemetry", b.open_telemetry.is_some()),
                ],
                errs,
            );
            if let Some(z) = &b.zipkin
                && let Err(m) = check_http_url(&z.url)
            {
                errs.add(join(&p, "zipkin.url"), m);
            }
            if let Some(o) = &b.open_telemetry
                && let Err(m) = check_endpoint(&o.endpoint)
            {
                errs.add(join(&p, "openTelemetry.endpoint"), m);
            }
        }
        for (i, t) in self.tags.iter().enumerate() {
            let p = index(path, "tags", i);
            if t.name.is_empty() {
                errs.add(join(&p, "name"), "must not be empty (e.g. team)");
            }
            exactly_one(
                &p,
                &[
                    ("literal", t.literal.is_some()),
                    ("header", t.header.is_some()),
                ],
                errs,
            );
            if let Some(h) = &t.header
                && let Err(m) = check_header_name(&h.name)
            {
                errs.add(join(&p, "header.name"), m);
            }
        }
    }
}

impl Conf for MeshTraceConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP,
        to: allow::NONE,
        from: allow::NONE,
        rules: false,
        default: true,
    };
}

// ---------------------------------------------------------------------------------------------
// MeshMetric

/// Which metrics proxies expose and where they go.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshMetricConf {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarMetrics>,
    /// Application metrics endpoints the proxy scrapes and merges into its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applications: Vec<Application>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<MetricBackend>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarMetrics {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_unused: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profiles: Option<Profiles>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profiles {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub append_profiles: Vec<Profile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<MetricSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<MetricSelector>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    pub name: ProfileName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProfileName {
    All,
    Basic,
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricSelector {
    #[serde(rename = "type")]
    pub kind: MetricSelectorType,
    #[serde(rename = "match")]
    pub pattern: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MetricSelectorType {
    Prefix,
    Regex,
    Exact,
    Contains,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Application {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub port: Port,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricBackend {
    #[serde(rename = "type")]
    pub kind: MetricBackendType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_telemetry: Option<OtelMetricBackend>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MetricBackendType {
    Prometheus,
    OpenTelemetry,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusBackend {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub port: Port,
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtelMetricBackend {
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_interval: Option<Duration>,
}

impl Spec for MeshMetricConf {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        for (i, a) in self.applications.iter().enumerate() {
            if let Some(p) = &a.path
                && !p.starts_with('/')
            {
                errs.add(
                    join(&index(path, "applications", i), "path"),
                    format!("must start with / (e.g. /metrics), got {p:?}"),
                );
            }
        }
        let mut ports = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let p = index(path, "backends", i);
            let (ty, field) = match b.kind {
                MetricBackendType::Prometheus => ("Prometheus", "prometheus"),
                MetricBackendType::OpenTelemetry => ("OpenTelemetry", "openTelemetry"),
            };
            let fields = [
                ("prometheus", b.prometheus.is_some()),
                ("openTelemetry", b.open_telemetry.is_some()),
            ];
            check_union(&p, ty, field, true, &fields, errs);
            if let Some(prom) = &b.prometheus {
                if !prom.path.starts_with('/') {
                    errs.add(
                        join(&p, "prometheus.path"),
                        format!("must start with / (e.g. /metrics), got {:?}", prom.path),
                    );
                }
                if !ports.insert(prom.port) {
                    errs.add(
                        join(&p, "prometheus.port"),
                        format!("port {} is already used by another Prometheus backend (pick another port)", prom.port.0),
                    );
                }
            }
            if let Some(o) = &b.open_telemetry {
                if let Err(m) = check_endpoint(&o.endpoint) {
                    errs.add(join(&p, "openTelemetry.endpoint"), m);
                }
                positive(
                    &join(&p, "openTelemetry"),
                    "refreshInterval",
                    o.refresh_interval,
                    errs,
                );
            }
        }
    }
}

impl Conf for MeshMetricConf {
    const SECTIONS: Sections = Sections {
        top: allow::TOP,
        to: allow::NONE,
        from: allow::NONE,
        rules: false,
        default: true,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert!(is_prime(65537));
        assert!(is_prime(MAX_MAGLEV_TABLE));
        assert!(!is_prime(65536));
        assert!(!is_prime(1));
        assert!(is_prime(2));
    }

    #[test]
    fn bandwidths() {
        for ok in ["50kbps", "5Mbps", "1Gbps", "100bps"] {
            check_bandwidth(ok).unwrap();
        }
        for bad in ["", "kbps", "5 Mbps", "5mbps", "1.5Gbps"] {
            assert!(check_bandwidth(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_conditions_accept_numbers_and_names() {
        let v: Vec<HttpRetryOn> =
            serde_json::from_value(serde_json::json!(["5xx", 503, "429"])).unwrap();
        assert_eq!(
            v,
            [
                HttpRetryOn("5xx".into()),
                HttpRetryOn("503".into()),
                HttpRetryOn("429".into())
            ]
        );
        let err = serde_json::from_value::<HttpRetryOn>(serde_json::json!("5XX")).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected an HTTP status such as 503"),
            "{err}"
        );
        assert!(serde_json::from_value::<HttpRetryOn>(serde_json::json!(700)).is_err());
    }
}
