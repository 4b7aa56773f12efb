//! Names the data plane puts on the wire, defined in one place: the **SNI** a proxy sends when
//! it connects to another proxy (directly, or through another zone's ingress), and the mesh's
//! **DNS names** (`<service>.mesh`, `<service>.<zone>.mesh`).
//!
//! SNI: `<service>.<zone>.<mesh>.weft`. Service, zone and mesh names are DNS labels (validation
//! makes sure of it: `weft.io/service` values, zone and mesh names), so the SNI is a valid DNS
//! name (at most 3 × 63 + 8 characters) and splits back unambiguously. It names the target
//! zone so that an ingress can refuse traffic meant for another zone, and it carries no secret:
//! everything it says is also in the certificate the server presents.

use std::fmt;
use std::str::FromStr;

use crate::validate::check_dns_label;

/// The suffix of every SNI weft sends.
pub const SNI_SUFFIX: &str = "weft";
/// The DNS domain of mesh services.
pub const DNS_DOMAIN: &str = "mesh";

/// What an SNI names: a service of a mesh, in a zone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sni {
    pub mesh: String,
    pub service: String,
    pub zone: String,
}

impl Sni {
    pub fn new(mesh: &str, service: &str, zone: &str) -> Sni {
        Sni {
            mesh: mesh.to_string(),
            service: service.to_string(),
            zone: zone.to_string(),
        }
    }
}

impl fmt::Display for Sni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{SNI_SUFFIX}",
            self.service, self.zone, self.mesh
        )
    }
}

impl FromStr for Sni {
    type Err = String;

    /// Parse an SNI; case-insensitive (DNS names are), the result is lower case.
    fn from_str(s: &str) -> Result<Sni, String> {
        let lower = s.to_ascii_lowercase();
        let labels: Vec<&str> = lower.split('.').collect();
        let [service, zone, mesh, suffix] = labels.as_slice() else {
            return Err(format!(
                "SNI {s:?} is not <service>.<zone>.<mesh>.{SNI_SUFFIX}"
            ));
        };
        if *suffix != SNI_SUFFIX {
            return Err(format!(
                "SNI {s:?} does not end in .{SNI_SUFFIX} (not a weft SNI)"
            ));
        }
        for (what, label) in [("service", service), ("zone", zone), ("mesh", mesh)] {
            check_dns_label(label).map_err(|m| format!("SNI {s:?}: the {what} {m}"))?;
        }
        Ok(Sni::new(mesh, service, zone))
    }
}

/// A mesh DNS name: `<service>.mesh` or `<service>.<zone>.mesh`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName {
    pub service: String,
    /// The zone the name is pinned to; `None` for `<service>.mesh` (local zone first).
    pub zone: Option<String>,
}

impl DnsName {
    pub fn new(service: &str, zone: Option<&str>) -> DnsName {
        DnsName {
            service: service.to_string(),
            zone: zone.map(str::to_string),
        }
    }

    /// Parse a query name (trailing dot and case ignored). `None` when the name is not under
    /// `.mesh` (forward it upstream); `Some(Err)` when it is, but is not a service name (answer
    /// NXDOMAIN).
    pub fn parse(name: &str) -> Option<Result<DnsName, String>> {
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        let rest = lower.strip_suffix(DNS_DOMAIN)?;
        if !(rest.is_empty() || rest.ends_with('.')) {
            return None;
        }
        let rest = rest.trim_end_matches('.');
        let labels: Vec<&str> = rest.split('.').collect();
        let parsed = match labels.as_slice() {
            [""] => Err(format!("{name:?}: no service name before .{DNS_DOMAIN}")),
            [service] => check_dns_label(service)
                .map(|()| DnsName::new(service, None))
                .map_err(|m| format!("{name:?}: the service {m}")),
            [service, zone] => check_dns_label(service)
                .and_then(|()| check_dns_label(zone))
                .map(|()| DnsName::new(service, Some(zone)))
                .map_err(|m| format!("{name:?}: {m}")),
            _ => Err(format!(
                "{name:?} is not <service>.{DNS_DOMAIN} or <service>.<zone>.{DNS_DOMAIN}"
            )),
        };
        Some(parsed)
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.zone {
            None => write!(f, "{}.{DNS_DOMAIN}", self.service),
            Some(z) => write!(f, "{}.{z}.{DNS_DOMAIN}", self.service),
        }
    }
}

/// The SPIFFE path (service part) of the zone egress of `zone` in every mesh:
/// `spiffe://<mesh>/zone-egress.<zone>`. The dot makes it a name no workload can have
/// (a `weft.io/service` is a DNS label), so a proxy that expects its egress's identity can
/// only be answered by the egress.
pub fn egress_identity(zone: &str) -> String {
    format!("zone-egress.{zone}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trips_and_is_a_dns_name() {
        let sni = Sni::new("payments", "backend", "west");
        assert_eq!(sni.to_string(), "backend.west.payments.weft");
        assert_eq!("backend.west.payments.weft".parse::<Sni>().unwrap(), sni);
        assert_eq!("Backend.WEST.payments.weft".parse::<Sni>().unwrap(), sni);
        let long = "a".repeat(63);
        let sni = Sni::new(&long, &long, &long);
        let s = sni.to_string();
        assert!(s.len() <= 253, "{}", s.len());
        assert!(rustls_like_dns_name(&s));
        assert_eq!(s.parse::<Sni>().unwrap(), sni);
    }

    fn rustls_like_dns_name(s: &str) -> bool {
        s.split('.').all(|l| check_dns_label(l).is_ok())
    }

    #[test]
    fn bad_snis_say_why() {
        for (sni, want) in [
            (
                "backend.west.payments",
                "is not <service>.<zone>.<mesh>.weft",
            ),
            ("a.b.c.d.weft", "is not <service>.<zone>.<mesh>.weft"),
            ("backend.west.payments.com", "does not end in .weft"),
            ("back_end.west.payments.weft", "the service"),
            ("backend..payments.weft", "the zone"),
            ("", "is not"),
        ] {
            let err = sni.parse::<Sni>().unwrap_err();
            assert!(err.contains(want), "{sni}: {err}");
        }
    }

    #[test]
    fn dns_names() {
        assert_eq!(
            DnsName::parse("backend.mesh").unwrap().unwrap(),
            DnsName::new("backend", None)
        );
        assert_eq!(
            DnsName::parse("Backend.West.Mesh.").unwrap().unwrap(),
            DnsName::new("backend", Some("west"))
        );
        assert_eq!(
            DnsName::new("backend", Some("west")).to_string(),
            "backend.west.mesh"
        );
        assert_eq!(DnsName::new("backend", None).to_string(), "backend.mesh");
        // Not ours: forwarded.
        assert!(DnsName::parse("example.com.").is_none());
        assert!(DnsName::parse("freshmesh").is_none());
        assert!(DnsName::parse("mesh.example.com").is_none());
        // Ours but not a service: NXDOMAIN.
        for bad in ["mesh.", "a.b.c.mesh", "bad_name.mesh", ".mesh"] {
            assert!(DnsName::parse(bad).unwrap().is_err(), "{bad}");
        }
    }
}
