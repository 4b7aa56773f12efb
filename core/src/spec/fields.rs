//! Field types and checks that several specs share: addresses, application protocols,
//! percentages, HTTP statuses, header names, service tags, and "one of" groups.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::validate::{Duration, Invalid, check_dns_label, check_label, join};

/// The tag naming the service a dataplane inbound or outbound belongs to.
pub const SERVICE_TAG: &str = "weft.io/service";

/// Check `s` is a hostname: DNS labels separated by dots, at most 253 characters.
pub fn check_hostname(s: &str) -> Result<(), String> {
    let ok = !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| check_dns_label(l).is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid hostname {s:?} (expected lowercase DNS labels separated by dots, e.g. api.example.com)"
        ))
    }
}

/// Check `s` is `host:port` (`[v6]:port` for IPv6), as for a TCP log collector.
pub fn check_host_port(s: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "invalid address {s:?} (expected host:port, e.g. logstash.internal:5000 or 10.0.0.5:5000)"
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host.parse::<std::net::Ipv4Addr>().is_ok() || check_hostname(host).is_ok(),
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Check `s` is an `http://` or `https://` URL with a host (and optional port and path).
pub fn check_http_url(s: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "invalid URL {s:?} (expected http:// or https:// and a host, e.g. http://zipkin.internal:9411/api/v2/spans)"
        )
    };
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(bad)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_ok = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => {
            port.parse::<u16>().is_ok_and(|p| p > 0) && check_url_host(host)
        }
        _ => check_url_host(authority),
    };
    if host_ok { Ok(()) } else { Err(bad()) }
}

fn check_url_host(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host.parse::<std::net::Ipv4Addr>().is_ok() || check_hostname(host).is_ok(),
    }
}

/// Check an OpenTelemetry collector endpoint: `host:port` (gRPC) or an `http(s)://` URL.
pub fn check_endpoint(s: &str) -> Result<(), String> {
    let checked = if s.contains("://") {
        check_http_url(s)
    } else {
        check_host_port(s)
    };
    checked.map_err(|_| {
        format!("invalid endpoint {s:?} (expected host:port or an http(s):// URL, e.g. otel-collector.observability:4317)")
    })
}

/// Check an HTTP header name (an RFC 7230 token).
pub fn check_header_name(s: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !s.is_empty() && s.bytes().all(token) {
        Ok(())
    } else {
        Err(format!(
            "invalid header name {s:?} (expected letters, digits and '-', e.g. x-request-id)"
        ))
    }
}

/// An IP address or a hostname. IP addresses are kept in canonical form (`::1`, not `0::1`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Address(pub String);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Address(ip.to_string()));
        }
        if check_hostname(&s).is_ok() {
            return Ok(Address(s));
        }
        Err(serde::de::Error::custom(format!(
            "invalid address {s:?} (expected an IP address or a hostname, e.g. 10.0.0.1 or backend.internal)"
        )))
    }
}

/// The application protocol of a port: how the sidecar treats its traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Http,
    Http2,
    Grpc,
}

/// A percentage, 0-100, written as a number (`50`, `12.5`) or a decimal string (`"12.5"`, as
/// Kuma allows). Whole numbers are kept as integers.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Percent(pub f64);

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.fract() == 0.0 {
            s.serialize_u64(self.0 as u64)
        } else {
            s.serialize_f64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let n = match &v {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match n {
            Some(n) if (0.0..=100.0).contains(&n) => Ok(Percent(n)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid percentage {v} (expected a number from 0 to 100, e.g. 50 or 12.5)"
            ))),
        }
    }
}

/// An HTTP status code, 100-599.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct StatusCode(pub u16);

impl<'de> Deserialize<'de> for StatusCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match v.as_u64() {
            Some(n @ 100..=599) => Ok(StatusCode(n as u16)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid HTTP status {v} (expected 100-599, e.g. 503)"
            ))),
        }
    }
}

/// A header to add or set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

impl Header {
    pub fn validate(&self, path: &str, errs: &mut Invalid) {
        if let Err(m) = check_header_name(&self.name) {
            errs.add(join(path, "name"), m);
        }
    }
}

/// Check dataplane tags: `weft.io/service` is required and is a DNS label; every tag is a
/// valid label.
pub fn check_service_tags(path: &str, tags: &BTreeMap<String, String>, errs: &mut Invalid) {
    match tags.get(SERVICE_TAG) {
        None => errs.add(
            path,
            format!("missing {SERVICE_TAG}: the service name, a DNS label (add e.g. {SERVICE_TAG}: backend)"),
        ),
        Some(service) => {
            if let Err(m) = check_dns_label(service) {
                errs.add(join(path, SERVICE_TAG), format!("{SERVICE_TAG} must be a DNS label: {m}"));
            }
        }
    }
    for (k, v) in tags.iter().filter(|(k, _)| k.as_str() != SERVICE_TAG) {
        if let Err(m) = check_label(k, v) {
            errs.add(join(path, k), m);
        }
    }
}

/// Check every entry of a tag or label map is a valid label.
pub fn check_tags(path: &str, tags: &BTreeMap<String, String>, errs: &mut Invalid) {
    for (k, v) in tags {
        if let Err(m) = check_label(k, v) {
            errs.add(join(path, k), m);
        }
    }
}

fn names(options: &[(&str, bool)]) -> String {
    options.iter().map(|o| o.0).collect::<Vec<_>>().join(", ")
}

/// Exactly one of the named fields is set.
pub fn exactly_one(path: &str, options: &[(&str, bool)], errs: &mut Invalid) {
    let set: Vec<&str> = options.iter().filter(|o| o.1).map(|o| o.0).collect();
    match set.len() {
        1 => {}
        0 => errs.add(path, format!("set exactly one of {}", names(options))),
        _ => errs.add(
            path,
            format!(
                "set exactly one of {} (found {})",
                names(options),
                set.join(" and ")
            ),
        ),
    }
}

/// At least one of the named fields is set: an empty object configures nothing.
pub fn at_least_one(path: &str, options: &[(&str, bool)], errs: &mut Invalid) {
    if !options.iter().any(|o| o.1) {
        errs.add(
            path,
            format!("empty: set at least one of {}", names(options)),
        );
    }
}

/// A `type` with one sibling object per type (`type: RingHash` with `ringHash: {...}`): the
/// sibling of another type must not be set, and the chosen type's sibling must be when
/// `required`.
pub fn check_union(
    path: &str,
    ty: &str,
    chosen: &str,
    required: bool,
    fields: &[(&str, bool)],
    errs: &mut Invalid,
) {
    for &(field, set) in fields {
        if field == chosen && required && !set {
            errs.add(join(path, field), format!("required with type {ty}"));
        }
        if field != chosen && set {
            errs.add(
                join(path, field),
                format!("not allowed with type {ty} (remove it, or change type)"),
            );
        }
    }
}

/// A duration that must be greater than zero.
pub fn positive(path: &str, field: &str, d: Option<Duration>, errs: &mut Invalid) {
    if d.is_some_and(|d| d.as_std().is_zero()) {
        errs.add(join(path, field), "must be greater than 0 (e.g. 5s)");
    }
}

/// A count that must be greater than zero.
pub fn nonzero(path: &str, field: &str, n: Option<u32>, errs: &mut Invalid) {
    if n == Some(0) {
        errs.add(join(path, field), "must be greater than 0");
    }
}

/// A list that must not be empty.
pub fn non_empty<T>(path: &str, field: &str, items: &[T], example: &str, errs: &mut Invalid) {
    if items.is_empty() {
        errs.add(
            join(path, field),
            format!("at least one entry required (e.g. {example})"),
        );
    }
}

/// `path[i]`.
pub fn index(path: &str, field: &str, i: usize) -> String {
    format!("{}[{i}]", join(path, field))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a: Address = serde_json::from_value(serde_json::json!("0:0::1")).unwrap();
        assert_eq!(a.0, "::1");
        assert!(serde_json::from_value::<Address>(serde_json::json!("backend.internal")).is_ok());
        let err =
            serde_json::from_value::<Address>(serde_json::json!("not an address")).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected an IP address or a hostname"),
            "{err}"
        );
    }

    #[test]
    fn host_ports_and_urls() {
        for ok in ["logstash:5000", "10.0.0.1:514", "[::1]:9000"] {
            check_host_port(ok).unwrap();
        }
        for bad in ["logstash", "logstash:0", ":5000", "a b:1", "::1:9000"] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
        for ok in [
            "http://zipkin:9411/api/v2/spans",
            "https://a.b",
            "http://[::1]:80/x",
            "http://10.0.0.1",
        ] {
            check_http_url(ok).unwrap();
        }
        for bad in [
            "zipkin:9411",
            "ftp://x",
            "http://",
            "http://a:0/",
            "http://a b/",
        ] {
            assert!(check_http_url(bad).is_err(), "{bad}");
        }
        check_endpoint("otel:4317").unwrap();
        check_endpoint("https://otel:4318").unwrap();
        assert!(check_endpoint("otel").is_err());
    }

    #[test]
    fn percentages_keep_whole_numbers_integral() {
        let p: Percent = serde_json::from_value(serde_json::json!("12.5")).unwrap();
        assert_eq!(p, Percent(12.5));
        assert_eq!(
            serde_json::to_value(Percent(50.0)).unwrap(),
            serde_json::json!(50)
        );
        assert_eq!(serde_json::to_value(p).unwrap(), serde_json::json!(12.5));
        for bad in [
            serde_json::json!(101),
            serde_json::json!(-1),
            serde_json::json!("x"),
            serde_json::json!(true),
        ] {
            assert!(serde_json::from_value::<Percent>(bad).is_err());
        }
    }

    #[test]
    fn statuses_and_headers() {
        assert!(serde_json::from_value::<StatusCode>(serde_json::json!(503)).is_ok());
        assert!(serde_json::from_value::<StatusCode>(serde_json::json!(700)).is_err());
        assert!(serde_json::from_value::<StatusCode>(serde_json::json!(99)).is_err());
        check_header_name("x-request-id").unwrap();
        assert!(check_header_name("x request").is_err());
        assert!(check_header_name("").is_err());
    }

    #[test]
    fn service_tags() {
        let mut errs = Invalid::default();
        check_service_tags(
            "tags",
            &BTreeMap::from([("version".into(), "v1".into())]),
            &mut errs,
        );
        assert_eq!(errs.errors.len(), 1);
        assert_eq!(errs.errors[0].field, "tags");
        assert!(errs.errors[0].message.contains("weft.io/service"));

        let mut errs = Invalid::default();
        check_service_tags(
            "tags",
            &BTreeMap::from([(SERVICE_TAG.into(), "Backend_1".into())]),
            &mut errs,
        );
        assert_eq!(errs.errors[0].field, "tags.weft.io/service");
        assert!(
            errs.errors[0].message.contains("DNS label"),
            "{}",
            errs.errors[0].message
        );
    }
}
