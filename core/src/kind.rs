//! Resource kinds: one table saying each kind's name, plural, scope and owner.

use std::fmt;
use std::str::FromStr;

/// Where a resource lives: in a mesh, or outside of any mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Global,
    Mesh,
}

/// Which control plane may write a kind. A zone refuses writes to global-owned kinds and
/// global refuses writes to zone-owned kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    Global,
    Zone,
}

macro_rules! kinds {
    ($( $kind:ident => $plural:literal, $scope:ident, $owner:ident, $policy:literal; )*) => {
        /// Every resource kind weft knows.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kind { $( $kind, )* }

        impl Kind {
            /// All kinds, in a stable order.
            pub const ALL: &'static [Kind] = &[ $( Kind::$kind, )* ];

            /// The `type` name, e.g. `MeshTimeout`.
            pub fn name(self) -> &'static str {
                match self { $( Kind::$kind => stringify!($kind), )* }
            }

            /// The lowercase plural used in URLs and on the command line, e.g. `meshtimeouts`.
            pub fn plural(self) -> &'static str {
                match self { $( Kind::$kind => $plural, )* }
            }

            pub fn scope(self) -> Scope {
                match self { $( Kind::$kind => Scope::$scope, )* }
            }

            pub fn owner(self) -> Owner {
                match self { $( Kind::$kind => Owner::$owner, )* }
            }

            /// Policies are the kinds with a `targetRef`.
            pub fn is_policy(self) -> bool {
                match self { $( Kind::$kind => $policy, )* }
            }
        }
    };
}

kinds! {
    Mesh => "meshes", Global, Global, false;
    Zone => "zones", Global, Global, false;
    Dataplane => "dataplanes", Mesh, Zone, false;
    ZoneIngress => "zoneingresses", Global, Zone, false;
    ZoneEgress => "zoneegresses", Global, Zone, false;
    MeshService => "meshservices", Mesh, Zone, false;
    MeshExternalService => "meshexternalservices", Mesh, Global, false;
    MeshTrafficPermission => "meshtrafficpermissions", Mesh, Global, true;
    MeshTimeout => "meshtimeouts", Mesh, Global, true;
    MeshRetry => "meshretries", Mesh, Global, true;
    MeshCircuitBreaker => "meshcircuitbreakers", Mesh, Global, true;
    MeshHealthCheck => "meshhealthchecks", Mesh, Global, true;
    MeshRateLimit => "meshratelimits", Mesh, Global, true;
    MeshFaultInjection => "meshfaultinjections", Mesh, Global, true;
    MeshLoadBalancingStrategy => "meshloadbalancingstrategies", Mesh, Global, true;
    MeshHTTPRoute => "meshhttproutes", Mesh, Global, true;
    MeshTCPRoute => "meshtcproutes", Mesh, Global, true;
    MeshAccessLog => "meshaccesslogs", Mesh, Global, true;
    MeshTrace => "meshtraces", Mesh, Global, true;
    MeshMetric => "meshmetrics", Mesh, Global, true;
}

impl Kind {
    /// Look a kind up by its `type` name, its plural, or its lowercase singular
    /// (`MeshTimeout`, `meshtimeouts`, `meshtimeout`), ignoring case.
    pub fn lookup(s: &str) -> Option<Kind> {
        Kind::ALL
            .iter()
            .copied()
            .find(|k| k.name().eq_ignore_ascii_case(s) || k.plural().eq_ignore_ascii_case(s))
    }

    /// The kind whose `type` name is exactly `s` (as documents and the wire spell it).
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == s)
    }

    /// The list of `type` names, for error messages.
    pub fn names() -> String {
        Kind::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for a string that names no kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?} (expected one of {names})", names = Kind::names())]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::lookup(s).ok_or_else(|| UnknownKind(s.to_string()))
    }
}

impl serde::Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // Exact type names only on the wire; `lookup` is for humans.
        Kind::from_name(&s).ok_or_else(|| serde::de::Error::custom(UnknownKind(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_accepts_names_and_plurals() {
        assert_eq!(Kind::lookup("meshtimeouts"), Some(Kind::MeshTimeout));
        assert_eq!(Kind::lookup("MeshTimeout"), Some(Kind::MeshTimeout));
        assert_eq!(Kind::lookup("meshhttproute"), Some(Kind::MeshHTTPRoute));
        assert_eq!(Kind::lookup("meshretries"), Some(Kind::MeshRetry));
        assert_eq!(Kind::lookup("nope"), None);
    }

    #[test]
    fn plurals_are_unique_and_lowercase() {
        let mut seen = std::collections::HashSet::new();
        for k in Kind::ALL {
            assert!(seen.insert(k.plural()), "duplicate plural {}", k.plural());
            assert_eq!(k.plural(), k.plural().to_ascii_lowercase());
        }
        assert_eq!(Kind::ALL.len(), 20);
    }

    #[test]
    fn ownership_table() {
        for k in [
            Kind::Dataplane,
            Kind::ZoneIngress,
            Kind::ZoneEgress,
            Kind::MeshService,
        ] {
            assert_eq!(k.owner(), Owner::Zone, "{k}");
        }
        assert_eq!(Kind::MeshTimeout.owner(), Owner::Global);
        assert_eq!(Kind::Mesh.scope(), Scope::Global);
        assert_eq!(Kind::MeshTimeout.scope(), Scope::Mesh);
    }
}
