//! The policy shape shared by every policy kind: a top-level `targetRef` (who the policy
//! applies to), then `to[]` (outbound, per destination), `from[]` (inbound, per source),
//! `rules[]` (inbound, for everyone) or a single `default`, each carrying the kind's
//! configuration. Which sections and which targetRef kinds a policy allows is one table,
//! [`Sections`], per configuration type.

use serde::{Deserialize, Serialize};

use super::Spec;
use super::target_ref::{TargetKind, TargetRef};
use crate::validate::{Duration, Invalid, join};

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
    use super::TargetKind::*;
    use super::TargetKind;
    /// Who a policy can apply to (the top-level targetRef).
    pub const TOP: &[TargetKind] = &[Mesh, MeshSubset, MeshService, MeshServiceSubset, Dataplane];
    pub const TOP_WITH_ROUTE: &[TargetKind] = &[Mesh, MeshSubset, MeshService, MeshServiceSubset, Dataplane, MeshHttpRoute];
    /// Destinations.
    pub const TO: &[TargetKind] = &[Mesh, MeshService, MeshExternalService];
    pub const TO_SERVICE: &[TargetKind] = &[Mesh, MeshService];
    /// Sources.
    pub const FROM: &[TargetKind] = &[Mesh, MeshSubset, MeshService, MeshServiceSubset];
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

impl<C: Conf> Spec for PolicySpec<C> {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        let s = C::SECTIONS;
        self.target_ref.check(&join(path, "targetRef"), s.top, errs);
        let mut present = Vec::new();
        if let Some(to) = &self.to {
            present.push("to");
            if s.to.is_empty() {
                errs.add(join(path, "to"), "not allowed for this policy (use from or rules)");
            } else {
                for (i, e) in to.iter().enumerate() {
                    let p = format!("{}[{i}]", join(path, "to"));
                    e.target_ref.check(&join(&p, "targetRef"), s.to, errs);
                    e.default.validate(&join(&p, "default"), errs);
                }
            }
        }
        if let Some(from) = &self.from {
            present.push("from");
            if s.from.is_empty() {
                errs.add(join(path, "from"), "not allowed for this policy (use to)");
            } else {
                for (i, e) in from.iter().enumerate() {
                    let p = format!("{}[{i}]", join(path, "from"));
                    e.target_ref.check(&join(&p, "targetRef"), s.from, errs);
                    e.default.validate(&join(&p, "default"), errs);
                }
            }
        }
        if let Some(rules) = &self.rules {
            present.push("rules");
            if !s.rules {
                errs.add(join(path, "rules"), "not allowed for this policy");
            } else {
                for (i, e) in rules.iter().enumerate() {
                    e.default.validate(&join(&format!("{}[{i}]", join(path, "rules")), "default"), errs);
                }
            }
        }
        if let Some(d) = &self.default {
            present.push("default");
            if !s.default {
                errs.add(join(path, "default"), "not allowed at the top level of this policy (put it under to[] or from[])");
            } else {
                d.validate(&join(path, "default"), errs);
            }
        }
        if present.is_empty() {
            let mut options = Vec::new();
            if !s.to.is_empty() { options.push("to"); }
            if !s.from.is_empty() { options.push("from"); }
            if s.rules { options.push("rules"); }
            if s.default { options.push("default"); }
            errs.add(path, format!("missing configuration: set one of {}", options.join(", ")));
        }
    }
}

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

impl Spec for MeshTimeoutConf {}

impl Conf for MeshTimeoutConf {
    const SECTIONS: Sections = Sections { top: allow::TOP_WITH_ROUTE, to: allow::TO, from: allow::FROM, rules: true, default: false };
}
