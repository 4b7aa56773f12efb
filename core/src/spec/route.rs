//! Route specs: `MeshHTTPRoute` and `MeshTCPRoute`. Their `to[]` entries carry `rules[]`
//! (what to match, where to send it) instead of a single `default`, so they implement
//! [`Spec`] directly rather than through `PolicySpec`; targetRefs are still checked with
//! [`TargetRef::check`].

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::Spec;
use super::fields::{
    Header, Percent, at_least_one, check_header_name, check_hostname, check_union, index,
};
use super::policy::allow;
use super::target_ref::{TargetKind, TargetRef};
use crate::validate::{Invalid, Name, Port, join};

/// Who a route applies to (the top-level targetRef).
pub const TOP: &[TargetKind] = allow::TOP;

/// Where a route sends traffic: a service (or subset of one) with a weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    pub kind: TargetKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Relative share of traffic; 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
}

impl BackendRef {
    /// The resources this backend names, as a targetRef.
    pub fn target_ref(&self) -> TargetRef {
        TargetRef {
            kind: self.kind,
            name: self.name.clone(),
            tags: self.tags.clone(),
            labels: self.labels.clone(),
            section_name: None,
        }
    }

    fn check(&self, path: &str, allowed: &[TargetKind], errs: &mut Invalid) {
        self.target_ref().check(path, allowed, errs);
    }
}

/// Check the top-level targetRef and that `to` is there.
fn check_route(path: &str, target_ref: &TargetRef, to_len: usize, errs: &mut Invalid) {
    target_ref.check(&join(path, "targetRef"), TOP, errs);
    if to_len == 0 {
        errs.add(
            join(path, "to"),
            "at least one destination required (e.g. to: [{targetRef: {kind: MeshService, name: backend}, rules: [...]}])",
        );
    }
}

/// Check one `to[]` entry's targetRef and that it has rules.
fn check_to(path: &str, target_ref: &TargetRef, rules_len: usize, errs: &mut Invalid) {
    target_ref.check(&join(path, "targetRef"), allow::ROUTE_TO, errs);
    if rules_len == 0 {
        errs.add(join(path, "rules"), "at least one rule required");
    }
}

fn check_backend_refs(path: &str, refs: &[BackendRef], errs: &mut Invalid) {
    for (i, b) in refs.iter().enumerate() {
        b.check(&index(path, "backendRefs", i), allow::BACKEND, errs);
    }
}

// ---------------------------------------------------------------------------------------------
// MeshHTTPRoute

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshHttpRouteSpec {
    /// Whose outbound traffic is routed; `Mesh` when absent.
    #[serde(default = "TargetRef::mesh")]
    pub target_ref: TargetRef,
    #[serde(default)]
    pub to: Vec<HttpRouteTo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTo {
    pub target_ref: TargetRef,
    #[serde(default)]
    pub rules: Vec<HttpRule>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRule {
    /// A request matching any entry matches the rule.
    #[serde(default)]
    pub matches: Vec<HttpMatch>,
    pub default: HttpRuleConf,
}

/// Every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryParamMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(rename = "type")]
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    PathPrefix,
    RegularExpression,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Connect,
    Delete,
    Get,
    Head,
    Options,
    Patch,
    Post,
    Put,
    Trace,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryParamMatch {
    #[serde(rename = "type")]
    pub kind: QueryParamMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QueryParamMatchType {
    Exact,
    RegularExpression,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// `Exact` when absent.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<HeaderMatchType>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HeaderMatchType {
    Exact,
    Present,
    RegularExpression,
    Absent,
    Prefix,
}

/// What a matching request gets: filters, then the backends (the `to` target when empty).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRuleConf {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: FilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<Header>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Header>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
    /// 302 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathRewrite {
    #[serde(rename = "type")]
    pub kind: PathRewriteType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathRewriteType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    /// 100 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    pub backend_ref: BackendRef,
}

const REDIRECT_STATUSES: &[u16] = &[301, 302, 303, 307, 308];

impl HttpMatch {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        if let Some(m) = &self.path {
            let p = join(path, "path.value");
            match m.kind {
                PathMatchType::Exact | PathMatchType::PathPrefix if !m.value.starts_with('/') => {
                    errs.add(p, format!("must be an absolute path starting with / (e.g. /api), got {:?}", m.value))
                }
                PathMatchType::PathPrefix if m.value.len() > 1 && m.value.ends_with('/') => errs.add(
                    p,
                    format!(
                        "remove the trailing / ({:?}): a prefix matches whole path segments, so /api matches /api/users",
                        m.value
                    ),
                ),
                PathMatchType::RegularExpression if m.value.is_empty() => {
                    errs.add(p, "must not be empty (e.g. ^/api/v[0-9]+/)")
                }
                _ => {}
            }
        }
        let mut names = HashMap::new();
        for (i, q) in self.query_params.iter().enumerate() {
            let p = join(&index(path, "queryParams", i), "name");
            if q.name.is_empty() {
                errs.add(p, "must not be empty");
            } else if let Some(first) = names.insert(&q.name, i) {
                errs.add(
                    p,
                    format!(
                        "duplicate query parameter {:?} (queryParams[{first}] matches it already)",
                        q.name
                    ),
                );
            }
        }
        for (i, h) in self.headers.iter().enumerate() {
            let p = index(path, "headers", i);
            if let Err(m) = check_header_name(&h.name) {
                errs.add(join(&p, "name"), m);
            }
            let kind = h.kind.unwrap_or(HeaderMatchType::Exact);
            match (kind, &h.value) {
                (HeaderMatchType::Present | HeaderMatchType::Absent, Some(_)) => errs.add(
                    join(&p, "value"),
                    format!("not allowed with type {kind:?} (remove it)"),
                ),
                (
                    HeaderMatchType::Exact
                    | HeaderMatchType::Prefix
                    | HeaderMatchType::RegularExpression,
                    None,
                ) => errs.add(join(&p, "value"), format!("required with type {kind:?}")),
                _ => {}
            }
        }
    }
}

impl HeaderModifier {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        at_least_one(
            path,
            &[
                ("set", !self.set.is_empty()),
                ("add", !self.add.is_empty()),
                ("remove", !self.remove.is_empty()),
            ],
            errs,
        );
        // One action per header name: (field path, header name).
        let mut named: Vec<(String, &str)> = Vec::new();
        for (list, headers) in [("set", &self.set), ("add", &self.add)] {
            named.extend(
                headers
                    .iter()
                    .enumerate()
                    .map(|(i, h)| (join(&index(path, list, i), "name"), h.name.as_str())),
            );
        }
        named.extend(
            self.remove
                .iter()
                .enumerate()
                .map(|(i, n)| (index(path, "remove", i), n.as_str())),
        );
        let mut seen = HashMap::new();
        for (field, name) in named {
            if let Err(m) = check_header_name(name) {
                errs.add(field, m);
            } else if let Some(first) = seen.insert(name.to_ascii_lowercase(), field.clone()) {
                errs.add(
                    field,
                    format!(
                        "header {name:?} is already changed by {first} (one action per header)"
                    ),
                );
            }
        }
    }
}

impl PathRewrite {
    fn validate(&self, path: &str, matches: &[HttpMatch], errs: &mut Invalid) {
        let (ty, field) = match self.kind {
            PathRewriteType::ReplaceFullPath => ("ReplaceFullPath", "replaceFullPath"),
            PathRewriteType::ReplacePrefixMatch => ("ReplacePrefixMatch", "replacePrefixMatch"),
        };
        let fields = [
            ("replaceFullPath", self.replace_full_path.is_some()),
            ("replacePrefixMatch", self.replace_prefix_match.is_some()),
        ];
        check_union(path, ty, field, true, &fields, errs);
        let prefix_only = !matches.is_empty()
            && matches.iter().all(|m| {
                m.path
                    .as_ref()
                    .is_some_and(|p| p.kind == PathMatchType::PathPrefix)
            });
        if self.kind == PathRewriteType::ReplacePrefixMatch && !prefix_only {
            errs.add(
                join(path, "type"),
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix path match (use ReplaceFullPath)",
            );
        }
    }
}

impl Filter {
    fn validate(&self, path: &str, matches: &[HttpMatch], errs: &mut Invalid) {
        let (ty, field) = match self.kind {
            FilterType::RequestHeaderModifier => ("RequestHeaderModifier", "requestHeaderModifier"),
            FilterType::ResponseHeaderModifier => {
                ("ResponseHeaderModifier", "responseHeaderModifier")
            }
            FilterType::RequestRedirect => ("RequestRedirect", "requestRedirect"),
            FilterType::UrlRewrite => ("URLRewrite", "urlRewrite"),
            FilterType::RequestMirror => ("RequestMirror", "requestMirror"),
        };
        let fields = [
            (
                "requestHeaderModifier",
                self.request_header_modifier.is_some(),
            ),
            (
                "responseHeaderModifier",
                self.response_header_modifier.is_some(),
            ),
            ("requestRedirect", self.request_redirect.is_some()),
            ("urlRewrite", self.url_rewrite.is_some()),
            ("requestMirror", self.request_mirror.is_some()),
        ];
        check_union(path, ty, field, true, &fields, errs);
        if let Some(m) = &self.request_header_modifier {
            m.validate(&join(path, "requestHeaderModifier"), errs);
        }
        if let Some(m) = &self.response_header_modifier {
            m.validate(&join(path, "responseHeaderModifier"), errs);
        }
        if let Some(r) = &self.request_redirect {
            let p = join(path, "requestRedirect");
            if let Some(code) = r.status_code
                && !REDIRECT_STATUSES.contains(&code)
            {
                errs.add(
                    join(&p, "statusCode"),
                    format!("invalid redirect status {code} (expected 301, 302, 303, 307 or 308)"),
                );
            }
            if let Some(h) = &r.hostname
                && let Err(m) = check_hostname(h)
            {
                errs.add(join(&p, "hostname"), m);
            }
            if let Some(rw) = &r.path {
                rw.validate(&join(&p, "path"), matches, errs);
            }
        }
        if let Some(r) = &self.url_rewrite {
            let p = join(path, "urlRewrite");
            at_least_one(
                &p,
                &[
                    ("hostname", r.hostname.is_some()),
                    ("path", r.path.is_some()),
                ],
                errs,
            );
            if let Some(h) = &r.hostname
                && let Err(m) = check_hostname(h)
            {
                errs.add(join(&p, "hostname"), m);
            }
            if let Some(rw) = &r.path {
                rw.validate(&join(&p, "path"), matches, errs);
            }
        }
        if let Some(m) = &self.request_mirror {
            m.backend_ref
                .check(&join(path, "requestMirror.backendRef"), allow::MIRROR, errs);
        }
    }
}

impl Spec for MeshHttpRouteSpec {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        check_route(path, &self.target_ref, self.to.len(), errs);
        for (i, to) in self.to.iter().enumerate() {
            let p = index(path, "to", i);
            check_to(&p, &to.target_ref, to.rules.len(), errs);
            for (j, rule) in to.rules.iter().enumerate() {
                let p = index(&p, "rules", j);
                if rule.matches.is_empty() {
                    errs.add(
                        join(&p, "matches"),
                        "at least one match required (e.g. matches: [{path: {type: PathPrefix, value: /}}])",
                    );
                }
                for (k, m) in rule.matches.iter().enumerate() {
                    m.validate(&index(&p, "matches", k), errs);
                }
                let p = join(&p, "default");
                for (k, f) in rule.default.filters.iter().enumerate() {
                    f.validate(&index(&p, "filters", k), &rule.matches, errs);
                }
                check_backend_refs(&p, &rule.default.backend_refs, errs);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MeshTCPRoute

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshTcpRouteSpec {
    /// Whose outbound traffic is routed; `Mesh` when absent.
    #[serde(default = "TargetRef::mesh")]
    pub target_ref: TargetRef,
    #[serde(default)]
    pub to: Vec<TcpRouteTo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRouteTo {
    pub target_ref: TargetRef,
    #[serde(default)]
    pub rules: Vec<TcpRule>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRule {
    pub default: TcpRuleConf,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRuleConf {
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

impl Spec for MeshTcpRouteSpec {
    fn validate(&self, path: &str, errs: &mut Invalid) {
        check_route(path, &self.target_ref, self.to.len(), errs);
        for (i, to) in self.to.iter().enumerate() {
            let p = index(path, "to", i);
            check_to(&p, &to.target_ref, to.rules.len(), errs);
            if to.rules.len() > 1 {
                errs.add(
                    join(&p, "rules"),
                    format!("TCP has nothing to match on, so one rule per destination (got {}; merge them)", to.rules.len()),
                );
            }
            for (j, rule) in to.rules.iter().enumerate() {
                let p = join(&index(&p, "rules", j), "default");
                if rule.default.backend_refs.is_empty() {
                    errs.add(
                        join(&p, "backendRefs"),
                        "at least one backend required (e.g. backendRefs: [{kind: MeshService, name: backend-v2, weight: 100}])",
                    );
                }
                check_backend_refs(&p, &rule.default.backend_refs, errs);
            }
        }
    }
}
