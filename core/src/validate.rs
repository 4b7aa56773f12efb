//! Validation: errors that name the field and the fix, and the small value types
//! (durations, ports, CIDRs, DNS-label names) that specs are built from.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One problem with one field: `spec.to[0].default.http.requestTimeout: invalid duration ...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// A rejected resource: every field problem found. Permanent: fix the input and retry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct Invalid {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msgs: Vec<String> = self.errors.iter().map(|e| e.to_string()).collect();
        f.write_str(&msgs.join("; "))
    }
}

impl Invalid {
    pub fn one(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut i = Invalid::default();
        i.add(field, message);
        i
    }

    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Ok(())` when nothing was found, else `Err(self)`.
    pub fn into_result(self) -> Result<(), Invalid> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }

    /// Prefix every field with `prefix` (e.g. the document index in a multi-document file).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        for e in &mut self.errors {
            e.field = join(prefix, &e.field);
        }
        self
    }
}

/// Join two field paths: `join("spec", "to[0]") == "spec.to[0]"`.
pub fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ if b.starts_with('[') => format!("{a}{b}"),
        _ => format!("{a}.{b}"),
    }
}

/// Deserialize `value` into `T`, reporting the failing field's path under `prefix`.
pub fn from_value<T: serde::de::DeserializeOwned>(
    prefix: &str,
    value: serde_json::Value,
) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        Invalid::one(
            join(prefix, &path),
            clean_serde_message(&e.inner().to_string()),
        )
    })
}

/// serde's messages use backticks; keep them, but drop serde_json's position suffix,
/// which means nothing for a value that came from YAML.
fn clean_serde_message(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Check a name is an RFC 1123 DNS label: lowercase letters, digits and `-`, starting and
/// ending with a letter or digit, at most 63 characters.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    const FIX: &str = "(expected a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters, e.g. backend-v2)";
    if name.is_empty() {
        return Err(format!("must not be empty {FIX}"));
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !name.starts_with('-') && !name.ends_with('-');
    if name.len() > 63 || !ok_chars || !ok_ends {
        return Err(format!("invalid name {name:?} {FIX}"));
    }
    Ok(())
}

/// Check a label key (`prefix/name` where prefix is a DNS subdomain) and value.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    let valid_part = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
    };
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if !valid_part(prefix, 253) {
                return Err(format!(
                    "invalid label key {key:?} (expected [prefix/]name, e.g. weft.io/zone)"
                ));
            }
            name
        }
        None => key,
    };
    if !valid_part(name, 63) {
        return Err(format!(
            "invalid label key {key:?} (expected [prefix/]name of letters, digits, '-', '_', '.', e.g. team)"
        ));
    }
    if !value.is_empty() && !valid_part(value, 63) {
        return Err(format!(
            "invalid label value {value:?} (expected at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// A duration written the Go way Kuma users know: `5s`, `250ms`, `1m30s`, `1h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub fn as_std(self) -> std::time::Duration {
        self.0
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid duration {s:?} (expected e.g. 5s, 250ms, 1m30s)");
        if s == "0" {
            return Ok(Duration(std::time::Duration::ZERO));
        }
        let mut rest = s;
        let mut total: u128 = 0;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u128 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(|b| !b.is_ascii_digit()).count();
            let nanos_per: u128 = match &rest[..unit_len] {
                "ns" => 1,
                "us" | "µs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            total = total
                .checked_add(n.checked_mul(nanos_per).ok_or_else(bad)?)
                .ok_or_else(bad)?;
        }
        let total = u64::try_from(total).map_err(|_| bad())?;
        Ok(Duration(std::time::Duration::from_nanos(total)))
    }
}

impl fmt::Display for Duration {
    /// Canonical form: largest units first, e.g. `1h30m`, `1m5s`, `250ms`, `1s500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut n = self.0.as_nanos();
        if n == 0 {
            return f.write_str("0s");
        }
        for (unit, per) in [
            ("h", 3_600_000_000_000u128),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
            ("us", 1_000),
            ("ns", 1),
        ] {
            if n >= per {
                write!(f, "{}{}", n / per, unit)?;
                n %= per;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match v {
            serde_json::Value::String(s) => s.parse().map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!(
                "invalid duration {other} (expected a string such as 5s, 250ms, 1m30s)"
            ))),
        }
    }
}

/// A TCP/UDP port, 1-65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match v.as_u64() {
            Some(n @ 1..=65535) => Ok(Port(n as u16)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid port {v} (expected 1-65535)"
            ))),
        }
    }
}

/// An IP network in CIDR notation, e.g. `10.0.0.0/8`, `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid CIDR {s:?} (expected e.g. 10.0.0.0/8 or fd00::/8)");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A name that must be a DNS label (service names, route names, zone names inside specs).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        check_dns_label(&s).map_err(serde::de::Error::custom)?;
        Ok(Name(s))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_canonically() {
        for (input, canon) in [
            ("5s", "5s"),
            ("250ms", "250ms"),
            ("90s", "1m30s"),
            ("1h", "1h"),
            ("0", "0s"),
            ("1m30s", "1m30s"),
            ("1500ms", "1s500ms"),
        ] {
            let d: Duration = input.parse().unwrap();
            assert_eq!(d.to_string(), canon, "{input}");
            let again: Duration = canon.parse().unwrap();
            assert_eq!(again, d);
        }
        for bad in ["5 seconds", "", "s", "5", "5x", "-1s", "1.5s"] {
            let err = bad.parse::<Duration>().unwrap_err();
            assert!(err.contains("invalid duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn dns_labels() {
        for ok in ["a", "backend", "backend-v2", "0abc"] {
            check_dns_label(ok).unwrap();
        }
        for bad in ["", "Backend", "-a", "a-", "a.b", "a_b", &"a".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_and_ports() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().prefix, 8);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("fd00::/8".parse::<Cidr>().is_ok());
        assert!(serde_json::from_value::<Port>(serde_json::json!(0)).is_err());
        assert!(serde_json::from_value::<Port>(serde_json::json!(70000)).is_err());
        assert_eq!(
            serde_json::from_value::<Port>(serde_json::json!(8080)).unwrap(),
            Port(8080)
        );
    }

    #[test]
    fn labels() {
        check_label("weft.io/zone", "east").unwrap();
        check_label("team", "").unwrap();
        assert!(check_label("bad key!", "x").is_err());
        assert!(check_label("k", "-x").is_err());
    }

    #[test]
    fn field_paths_from_serde() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Http {
            #[serde(rename = "requestTimeout")]
            request_timeout: Duration,
        }
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Outer {
            to: Vec<Http>,
        }
        let err = from_value::<Outer>(
            "spec",
            serde_json::json!({"to": [{"requestTimeout": "5 seconds"}]}),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"spec.to[0].requestTimeout: invalid duration "5 seconds" (expected e.g. 5s, 250ms, 1m30s)"#
        );
    }
}
