//! The policy shape shared by every policy kind: a top-level `targetRef` (who the policy
//! applies to), then `to[]` (outbound, per destination), `from[]` (inbound, per source),
//! `rules[]` (inbound, for everyone) or a single `default`, each carrying the kind's
//! configuration. Which sections and which targetRef kinds a policy allows is one table,
//! [`Sections`], per configuration type.

use serde::{Deserialize, Serialize};

use super::Spec;
use super::fields::index;
use super::target_ref::{TargetKind, TargetRef};
use crate::validate::{Invalid, join};

/// Where a policy's configuration may appear and what each targetRef may name.
pub struct Sections {
    pub top: &'static [TargetKind],
    /// Allowed kinds in `to[].targetRef`; empty when `to` is not allowed.
    pub to: &'static [TargetKind],
    /// Allowed kinds in `from[].targetRef`; empty when `from` is not allowed.
    pub from: &'static [TargetKind],
    pub rules: bool,
    /// A single top-level `default` (MeshTrace, MeshMetric).
    pub default: bool,
}

/// Common allowed lists.
pub mod allow {
    use super::TargetKind;
    use super::TargetKind::*;
    /// Who a policy can apply to (the top-level targetRef).
    pub const TOP: &[TargetKind] = &[Mesh, MeshSubset, MeshService, MeshServiceSubset, Dataplane];
    /// MeshTrafficPermission: also an external service (enforced by the zone egress).
    pub const TOP_WITH_EXTERNAL: &[TargetKind] = &[
        Mesh,
        MeshSubset,
        MeshService,
        MeshServiceSubset,
        Dataplane,
        MeshExternalService,
    ];
    pub const TOP_WITH_ROUTE: &[TargetKind] = &[
        Mesh,
        MeshSubset,
        MeshService,
        MeshServiceSubset,
        Dataplane,
        MeshHttpRoute,
    ];
    /// Destinations.
    pub const TO: &[TargetKind] = &[Mesh, MeshService, MeshExternalService];
    pub const TO_SERVICE: &[TargetKind] = &[Mesh, MeshService];
    /// Sources.
    pub const FROM: &[TargetKind] = &[Mesh, MeshSubset, MeshService, MeshServiceSubset];
    /// Only the whole mesh (e.g. sources of a policy that cannot tell clients apart).
    pub const MESH: &[TargetKind] = &[Mesh];
    /// Destinations of a route.
    pub const ROUTE_TO: &[TargetKind] = &[MeshService, MeshExternalService];
    /// Where a route may send traffic.
    pub const BACKEND: &[TargetKind] = &[MeshService, MeshServiceSubset, MeshExternalService];
    /// Where a route may mirror traffic.
    pub const MIRROR: &[TargetKind] = &[MeshService, MeshServiceSubset];
    pub const NONE: &[TargetKind] = &[];
}

/// The configuration carried in a policy's `default`.
pub trait Conf: Spec {
    const SECTIONS: Sections;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To<C> {
    pub target_ref: TargetRef,
    pub default: C,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From<C> {
    pub target_ref: TargetRef,
    pub default: C,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule<C> {
    pub default: C,
}

/// A policy spec with configuration `C`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, bound = "C: Conf")]
pub struct PolicySpec<C> {
    /// Who the policy applies to; `Mesh` when absent.
    #[serde(default = "TargetRef::mesh")]
    pub target_ref: TargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<To<C>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<From<C>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule<C>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<C>,
}

impl Sections {
    /// The sections this policy allows, for messages: `to, from, rules`.
    pub fn options(&self) -> String {
        let mut options = Vec::new();
        if !self.to.is_empty() {
            options.push("to");
        }
        if !self.from.is_empty() {
            options.push("from");
        }
        if self.rules {
            options.push("rules");
        }
        if self.default {
            options.push("default");
        }
        options.join(", ")
    }
}

impl<C: Conf> Spec for PolicySpec<C> {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        let s = C::SECTIONS;
        self.target_ref.check(&join(path, "targetRef"), s.top, errs);
        let mut present = false;
        // Each present section: is it allowed here, is it non-empty, then check its entries.
        let mut section = |name: &str, allowed: bool, len: usize, errs: &mut Invalid| {
            present = true;
            let p = join(path, name);
            if !allowed {
                errs.add(
                    p,
                    format!("not allowed for this policy (use {} instead)", s.options()),
                );
                false
            } else if len == 0 {
                errs.add(p, "must not be empty (add an entry, or remove the field)");
                false
            } else {
                true
            }
        };
        if let Some(to) = &self.to
            && section("to", !s.to.is_empty(), to.len(), errs)
        {
            for (i, e) in to.iter().enumerate() {
                let p = index(path, "to", i);
                e.target_ref.check(&join(&p, "targetRef"), s.to, errs);
                e.default.validate(&join(&p, "default"), errs);
            }
        }
        if let Some(from) = &self.from
            && section("from", !s.from.is_empty(), from.len(), errs)
        {
            for (i, e) in from.iter().enumerate() {
                let p = index(path, "from", i);
                e.target_ref.check(&join(&p, "targetRef"), s.from, errs);
                e.default.validate(&join(&p, "default"), errs);
            }
        }
        if let Some(rules) = &self.rules
            && section("rules", s.rules, rules.len(), errs)
        {
            for (i, e) in rules.iter().enumerate() {
                e.default
                    .validate(&join(&index(path, "rules", i), "default"), errs);
            }
        }
        if let Some(d) = &self.default
            && section("default", s.default, 1, errs)
        {
            d.validate(&join(path, "default"), errs);
        }
        if !present {
            errs.add(
                path,
                format!("missing configuration: set one of {}", s.options()),
            );
        }
    }
}
