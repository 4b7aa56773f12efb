//! The policies that apply to one proxy, resolved with Kuma's rules: what the zone sends each
//! data plane. Pure: a `Dataplane` and the resources of its mesh in, a [`ProxyView`] out.
//!
//! The steps, per policy kind:
//! 1. **Select**: a policy applies when its top-level `targetRef` matches the proxy. Inbound
//!    sections (`rules`, `from`) are selected per inbound (a `MeshSubset` may pick one inbound
//!    of two); `to` and a top-level `default` apply when the ref matches any inbound (or the
//!    `Dataplane` itself). A top-level `MeshHTTPRoute` ref matches nothing yet: such policies
//!    (a `MeshTimeout` on one route) are left out until routes are resolved per request.
//! 2. **Order**: less specific ref first ([`TargetKind::specificity`]), then global-originated
//!    before zone-originated (`weft.io/origin`, so the zone wins), then by name.
//! 3. **Merge**: the confs are merged in that order with [`merge`] (objects key by key, later
//!    wins for everything else, arrays replaced whole), so the most specific policy wins
//!    field by field.
//!
//! Routes (`MeshHTTPRoute`, `MeshTCPRoute`) have `to[].rules` instead of `to[].default`: their
//! outbound conf is `{"rules": [...]}`, where a later rule with the same `matches` as an
//! earlier one is merged into it and other rules are appended (Kuma's route merging).
//!
//! Besides policies, the input may hold `MeshService` and `MeshExternalService` resources:
//! they resolve refs by `labels`, `sectionName` port names, and tell external destinations
//! from mesh services. Other kinds, and resources of other meshes, are ignored.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::kind::Kind;
use crate::resource::{Key, Resource};
use crate::spec::policies::Action;
use crate::spec::{DataplaneSpec, MeshServiceSpec, SERVICE_TAG, TargetKind, TargetRef};
use crate::validate::{self, Invalid};
use crate::{ORIGIN_LABEL, ZONE_LABEL};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not a Dataplane (policies are resolved for a Dataplane)")]
    NotDataplane(Key),
    /// A stored spec that does not have its kind's shape (stored resources are validated, so
    /// this means the input did not come from the store).
    #[error("{key}: {invalid}")]
    Invalid { key: Key, invalid: Invalid },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that applies to one proxy. Deterministic: maps are sorted, inbounds are in port
/// order, so equal inputs serialize to equal bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyView {
    pub mesh: String,
    pub dataplane: String,
    /// The mesh has mTLS enabled (`mtls.enabledBackend`): proxies talk mutual TLS with
    /// workload certificates; otherwise plaintext.
    #[serde(default)]
    pub mtls: bool,
    /// Traffic that no MeshTrafficPermission allows is denied (`Mesh.spec.defaultDeny`,
    /// which defaults to true when mTLS is on).
    #[serde(default)]
    pub default_deny: bool,
    pub inbounds: Vec<InboundView>,
    /// Per destination service (the dataplane's outbounds), per policy kind: the merged
    /// `to` conf. Every outbound is listed, with an empty map when nothing applies.
    pub outbounds: BTreeMap<String, BTreeMap<Kind, Value>>,
    /// Per policy kind with a top-level `default` (MeshTrace, MeshMetric): the merged conf.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub proxy: BTreeMap<Kind, Value>,
}

/// The inbound policies of one inbound (port).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundView {
    pub port: u16,
    pub service: String,
    pub tags: BTreeMap<String, String>,
    /// Per kind: the `rules[]` defaults merged; they apply to every client.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<Kind, Value>,
    /// Per kind: the `from[]` entries, one per distinct source ref, least specific first.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub from: BTreeMap<Kind, Vec<FromEntry>>,
}

/// One source matcher and the merged conf of every `from[]` entry with that exact ref.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FromEntry {
    pub target_ref: TargetRef,
    /// For a `MeshService` ref by labels: the names of the services it selects (from the
    /// `MeshService` resources given to [`resolve`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    pub conf: Value,
}

impl FromEntry {
    /// Whether a client with this service name and these tags is a source this entry names.
    pub fn matches(&self, service: &str, tags: &BTreeMap<String, String>) -> bool {
        let r = &self.target_ref;
        match r.kind {
            TargetKind::Mesh => true,
            TargetKind::MeshSubset => subset(r.tags.as_ref(), tags),
            TargetKind::MeshService => match &r.name {
                Some(n) => n.0 == service,
                None => self.services.iter().any(|s| s == service),
            },
            TargetKind::MeshServiceSubset => {
                r.name.as_ref().is_some_and(|n| n.0 == service) && subset(r.tags.as_ref(), tags)
            }
            _ => false,
        }
    }
}

impl InboundView {
    /// The conf of `kind` for one client: the `rules` conf, then every matching `from` entry
    /// merged over it, least specific first (so the most specific entry wins field by field).
    /// `None` when nothing applies.
    pub fn conf_for(
        &self,
        kind: Kind,
        service: &str,
        tags: &BTreeMap<String, String>,
    ) -> Option<Value> {
        let mut conf = self.rules.get(&kind).cloned();
        for e in self.from.get(&kind).into_iter().flatten() {
            if e.matches(service, tags) {
                merge_into(&mut conf, &e.conf);
            }
        }
        conf
    }

    /// MeshTrafficPermission's decision for a client: the most specific matching source
    /// wins; with none (and no `rules`), the mesh default: `Deny` when `default_deny`, else
    /// `Allow`.
    pub fn allows(
        &self,
        service: &str,
        tags: &BTreeMap<String, String>,
        default_deny: bool,
    ) -> Action {
        self.conf_for(Kind::MeshTrafficPermission, service, tags)
            .and_then(|c| serde_json::from_value::<Action>(c.get("action")?.clone()).ok())
            .unwrap_or(if default_deny {
                Action::Deny
            } else {
                Action::Allow
            })
    }
}

/// JSON merge: objects key by key (recursively), anything else (scalars, arrays, null) is
/// replaced by `patch`.
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn merge_into(acc: &mut Option<Value>, patch: &Value) {
    match acc {
        Some(a) => merge(a, patch),
        None => *acc = Some(patch.clone()),
    }
}

/// `want` ⊆ `have` (an absent or empty `want` matches everything).
fn subset(want: Option<&BTreeMap<String, String>>, have: &BTreeMap<String, String>) -> bool {
    want.into_iter()
        .flatten()
        .all(|(k, v)| have.get(k) == Some(v))
}

// ---------------------------------------------------------------------------------------------
// The generic policy shape: confs kept as JSON.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Policy {
    #[serde(default = "TargetRef::mesh")]
    target_ref: TargetRef,
    #[serde(default)]
    to: Vec<ToEntry>,
    #[serde(default)]
    from: Vec<Entry>,
    #[serde(default)]
    rules: Vec<RuleEntry>,
    #[serde(default)]
    default: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToEntry {
    target_ref: TargetRef,
    #[serde(default)]
    default: Option<Value>,
    /// Routes: `to[].rules` instead of `to[].default`.
    #[serde(default)]
    rules: Option<Vec<Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    target_ref: TargetRef,
    default: Value,
}

#[derive(Deserialize)]
struct RuleEntry {
    default: Value,
}

/// A parsed policy with its sort key.
struct Parsed<'a> {
    resource: &'a Resource,
    policy: Policy,
}

impl Parsed<'_> {
    /// Kuma's order: specificity, then origin (global before zone), then name.
    fn order(&self) -> (u8, u8, &str) {
        let origin = match self.resource.labels.get(ORIGIN_LABEL).map(String::as_str) {
            Some("zone") => 1,
            _ => 0,
        };
        (
            self.policy.target_ref.kind.specificity(),
            origin,
            self.resource.name.as_str(),
        )
    }
}

/// What resolution needs to know about the rest of the mesh.
struct Context<'a> {
    services: BTreeMap<&'a str, (&'a Resource, MeshServiceSpec)>,
    external: BTreeMap<&'a str, &'a Resource>,
}

impl Context<'_> {
    /// Whether a `MeshService` ref by labels selects the service named `service`.
    fn service_labels(&self, service: &str, labels: &BTreeMap<String, String>) -> bool {
        self.services
            .get(service)
            .is_some_and(|(r, _)| subset(Some(labels), &r.labels))
    }
}

/// The dataplane with its inbounds, for matching.
struct Proxy<'a> {
    resource: &'a Resource,
    spec: DataplaneSpec,
}

struct InboundRef<'a> {
    port: u16,
    service_port: u16,
    service: &'a str,
    tags: &'a BTreeMap<String, String>,
}

impl Proxy<'_> {
    fn inbounds(&self) -> Vec<InboundRef<'_>> {
        self.spec
            .networking
            .inbound
            .iter()
            .map(|ib| InboundRef {
                port: ib.port.0,
                service_port: ib.service_port.unwrap_or(ib.port).0,
                service: ib.tags.get(SERVICE_TAG).map(String::as_str).unwrap_or(""),
                tags: &ib.tags,
            })
            .collect()
    }

    /// Whether a top-level ref selects this inbound.
    fn selects(&self, r: &TargetRef, ib: &InboundRef<'_>, ctx: &Context<'_>) -> bool {
        let name = r.name.as_ref().map(|n| n.0.as_str());
        let kind_matches = match r.kind {
            TargetKind::Mesh => true,
            TargetKind::MeshSubset => subset(r.tags.as_ref(), ib.tags),
            TargetKind::MeshService => match (name, &r.labels) {
                (Some(n), _) => n == ib.service,
                (None, Some(labels)) => ctx.services.values().any(|(res, spec)| {
                    subset(Some(labels), &res.labels)
                        && subset(Some(&spec.selector.dataplane_tags), ib.tags)
                }),
                (None, None) => false,
            },
            TargetKind::MeshServiceSubset => {
                name == Some(ib.service) && subset(r.tags.as_ref(), ib.tags)
            }
            TargetKind::Dataplane => match (name, &r.labels) {
                (Some(n), _) => n == self.resource.name,
                (None, Some(labels)) => subset(Some(labels), &self.resource.labels),
                (None, None) => false,
            },
            // Left unmatched for now: see the module docs.
            TargetKind::MeshHttpRoute | TargetKind::MeshExternalService => false,
        };
        kind_matches && self.section_matches(r, ib, ctx)
    }

    /// `sectionName`: the inbound's port or service port by number, or a named port of the
    /// inbound's `MeshService` whose target port is this inbound.
    fn section_matches(&self, r: &TargetRef, ib: &InboundRef<'_>, ctx: &Context<'_>) -> bool {
        let Some(section) = &r.section_name else {
            return true;
        };
        if section == &ib.port.to_string() || section == &ib.service_port.to_string() {
            return true;
        }
        ctx.services.get(ib.service).is_some_and(|(_, spec)| {
            spec.ports.iter().any(|p| {
                p.name.as_ref().is_some_and(|n| &n.0 == section)
                    && p.target_port.unwrap_or(p.port).0 == ib.port
            })
        })
    }
}

/// Whether a `to[]` ref names the destination `dest`.
fn names_destination(r: &TargetRef, dest: &str, ctx: &Context<'_>) -> bool {
    let external = ctx.external.contains_key(dest);
    let name = r.name.as_ref().map(|n| n.0.as_str());
    match r.kind {
        TargetKind::Mesh => true,
        TargetKind::MeshService if !external => match (name, &r.labels) {
            (Some(n), _) => n == dest,
            (None, Some(labels)) => ctx.service_labels(dest, labels),
            (None, None) => false,
        },
        TargetKind::MeshExternalService if external => match (name, &r.labels) {
            (Some(n), _) => n == dest,
            (None, Some(labels)) => ctx
                .external
                .get(dest)
                .is_some_and(|res| subset(Some(labels), &res.labels)),
            (None, None) => false,
        },
        _ => false,
    }
}

/// Merge route rules: a rule whose `matches` equals an earlier one's is merged into it (its
/// `default` over the earlier `default`), any other is appended.
fn merge_route_rules(acc: &mut Option<Value>, rules: &[Value]) {
    let conf = acc.get_or_insert_with(|| serde_json::json!({"rules": []}));
    let Some(Value::Array(list)) = conf.get_mut("rules") else {
        unreachable!("route conf is built here with a rules array")
    };
    for rule in rules {
        let matches = rule.get("matches");
        match list.iter_mut().find(|r| r.get("matches") == matches) {
            Some(existing) => merge(existing, rule),
            None => list.push(rule.clone()),
        }
    }
}

/// A new `from` entry; a `MeshService` source by labels is resolved to service names.
fn from_entry(e: &Entry, ctx: &Context<'_>) -> FromEntry {
    let r = &e.target_ref;
    let services = match (r.kind, &r.name, &r.labels) {
        (TargetKind::MeshService, None, Some(labels)) => ctx
            .services
            .keys()
            .filter(|s| ctx.service_labels(s, labels))
            .map(|s| s.to_string())
            .collect(),
        _ => Vec::new(),
    };
    FromEntry {
        target_ref: r.clone(),
        services,
        conf: e.default.clone(),
    }
}

fn is_route(kind: Kind) -> bool {
    matches!(kind, Kind::MeshHTTPRoute | Kind::MeshTCPRoute)
}

/// Resolve what applies to `dataplane` among `resources` (the policies of its mesh, plus
/// optionally its `MeshService`s and `MeshExternalService`s; see the module docs).
pub fn resolve(dataplane: &Resource, resources: &[Resource]) -> Result<ProxyView> {
    if dataplane.kind != Kind::Dataplane {
        return Err(Error::NotDataplane(dataplane.key()));
    }
    let invalid = |r: &Resource, invalid: Invalid| Error::Invalid {
        key: r.key(),
        invalid,
    };
    let proxy = Proxy {
        resource: dataplane,
        spec: validate::from_value("spec", dataplane.spec.clone())
            .map_err(|e| invalid(dataplane, e))?,
    };
    let zone = dataplane.labels.get(ZONE_LABEL);

    let mut ctx = Context {
        services: BTreeMap::new(),
        external: BTreeMap::new(),
    };
    // Per kind, in Kuma's order.
    let mut by_kind: BTreeMap<Kind, Vec<Parsed<'_>>> = BTreeMap::new();
    for r in resources.iter().filter(|r| r.mesh == dataplane.mesh) {
        match r.kind {
            Kind::MeshService => {
                let spec =
                    validate::from_value("spec", r.spec.clone()).map_err(|e| invalid(r, e))?;
                ctx.services.insert(&r.name, (r, spec));
            }
            Kind::MeshExternalService => {
                ctx.external.insert(&r.name, r);
            }
            k if k.is_policy() => {
                // A zone-originated policy belongs to the proxies of its zone.
                let other_zone = r.labels.get(ORIGIN_LABEL).map(String::as_str) == Some("zone")
                    && zone.is_some()
                    && r.labels.get(ZONE_LABEL).is_some_and(|z| Some(z) != zone);
                if other_zone {
                    continue;
                }
                let policy =
                    validate::from_value("spec", r.spec.clone()).map_err(|e| invalid(r, e))?;
                by_kind.entry(k).or_default().push(Parsed {
                    resource: r,
                    policy,
                });
            }
            _ => {}
        }
    }
    for list in by_kind.values_mut() {
        list.sort_by(|a, b| a.order().cmp(&b.order()));
    }

    let mut inbounds: Vec<InboundRef<'_>> = proxy.inbounds();
    inbounds.sort_by_key(|ib| ib.port);

    // Outbound destinations, by service name.
    let destinations: BTreeSet<&str> = proxy
        .spec
        .networking
        .outbound
        .iter()
        .filter_map(|o| o.tags.get(SERVICE_TAG).map(String::as_str))
        .collect();

    let mesh_spec = resources
        .iter()
        .find(|r| r.kind == Kind::Mesh && Some(&r.name) == dataplane.mesh.as_ref())
        .map(|r| {
            validate::from_value::<crate::spec::mesh::MeshSpec>("spec", r.spec.clone())
                .map_err(|e| invalid(r, e))
        })
        .transpose()?
        .unwrap_or_default();
    let mtls = mesh_spec
        .mtls
        .as_ref()
        .is_some_and(|m| m.enabled_backend.is_some());
    let mut view = ProxyView {
        mesh: dataplane.mesh.clone().unwrap_or_default(),
        dataplane: dataplane.name.clone(),
        mtls,
        default_deny: mesh_spec.default_deny.unwrap_or(mtls),
        inbounds: inbounds
            .iter()
            .map(|ib| InboundView {
                port: ib.port,
                service: ib.service.to_string(),
                tags: ib.tags.clone(),
                ..InboundView::default()
            })
            .collect(),
        outbounds: destinations
            .iter()
            .map(|d| (d.to_string(), BTreeMap::new()))
            .collect(),
        proxy: BTreeMap::new(),
    };

    for (&kind, policies) in &by_kind {
        // Inbound: per inbound, the policies whose ref selects it.
        for (ib, out) in inbounds.iter().zip(view.inbounds.iter_mut()) {
            let selected: Vec<&Parsed<'_>> = policies
                .iter()
                .filter(|p| proxy.selects(&p.policy.target_ref, ib, &ctx))
                .collect();
            let mut rules = None;
            // (specificity, first position in policy order) -> entry; same ref merged.
            let mut from: Vec<(u8, usize, FromEntry)> = Vec::new();
            for p in &selected {
                for rule in &p.policy.rules {
                    merge_into(&mut rules, &rule.default);
                }
                for e in &p.policy.from {
                    match from
                        .iter_mut()
                        .find(|(_, _, f)| f.target_ref == e.target_ref)
                    {
                        Some((_, _, f)) => merge(&mut f.conf, &e.default),
                        None => {
                            let pos = from.len();
                            from.push((e.target_ref.kind.specificity(), pos, from_entry(e, &ctx)));
                        }
                    }
                }
            }
            if let Some(r) = rules {
                out.rules.insert(kind, r);
            }
            if !from.is_empty() {
                from.sort_by_key(|(s, pos, _)| (*s, *pos));
                out.from
                    .insert(kind, from.into_iter().map(|(_, _, f)| f).collect());
            }
        }

        // The policies that apply to the proxy as a whole: the ref selects some inbound.
        let selected: Vec<&Parsed<'_>> = policies
            .iter()
            .filter(|p| {
                inbounds
                    .iter()
                    .any(|ib| proxy.selects(&p.policy.target_ref, ib, &ctx))
            })
            .collect();

        // Outbound: per destination, the matching `to[]` entries; policy order first, then
        // the entry's own specificity (stable, so equal ones keep their written order).
        for dest in &destinations {
            let mut conf = None;
            for p in &selected {
                let mut entries: Vec<&ToEntry> = p
                    .policy
                    .to
                    .iter()
                    .filter(|e| names_destination(&e.target_ref, dest, &ctx))
                    .collect();
                entries.sort_by_key(|e| e.target_ref.kind.specificity());
                for e in entries {
                    if is_route(kind) {
                        merge_route_rules(&mut conf, e.rules.as_deref().unwrap_or_default());
                    } else if let Some(d) = &e.default {
                        merge_into(&mut conf, d);
                    }
                }
            }
            if let Some(c) = conf {
                view.outbounds
                    .get_mut(*dest)
                    .expect("every destination is listed")
                    .insert(kind, c);
            }
        }

        // The whole proxy: top-level `default`.
        let mut conf = None;
        for p in &selected {
            if let Some(d) = &p.policy.default {
                merge_into(&mut conf, d);
            }
        }
        if let Some(c) = conf {
            view.proxy.insert(kind, c);
        }
    }
    Ok(view)
}

/// The MeshTrafficPermission `from` entries that apply to the external service `external`
/// of `mesh` (what the zone egress enforces), as an [`InboundView`] whose
/// [`InboundView::allows`] decides per caller. A policy applies when its top-level ref is
/// the `Mesh`, or names this `MeshExternalService` (by name, or by labels its resource
/// carries); more specific first-class refs win, as for inbounds. Zone-originated policies
/// of another zone than `zone` are left out. A caller is known to the egress by its SPIFFE
/// ID only (no tags), so `MeshSubset` sources match only when they name no tags.
pub fn resolve_external(
    mesh: &str,
    external: &str,
    zone: Option<&str>,
    resources: &[Resource],
) -> Result<InboundView> {
    let invalid = |r: &Resource, invalid: Invalid| Error::Invalid {
        key: r.key(),
        invalid,
    };
    let mut ctx = Context {
        services: BTreeMap::new(),
        external: BTreeMap::new(),
    };
    let mut policies = Vec::new();
    for r in resources.iter().filter(|r| r.mesh.as_deref() == Some(mesh)) {
        match r.kind {
            Kind::MeshService => {
                let spec =
                    validate::from_value("spec", r.spec.clone()).map_err(|e| invalid(r, e))?;
                ctx.services.insert(&r.name, (r, spec));
            }
            Kind::MeshExternalService => {
                ctx.external.insert(&r.name, r);
            }
            Kind::MeshTrafficPermission => {
                let other_zone = r.labels.get(ORIGIN_LABEL).map(String::as_str) == Some("zone")
                    && zone.is_some()
                    && r.labels.get(ZONE_LABEL).map(String::as_str) != zone;
                if other_zone {
                    continue;
                }
                let policy: Policy =
                    validate::from_value("spec", r.spec.clone()).map_err(|e| invalid(r, e))?;
                policies.push(Parsed {
                    resource: r,
                    policy,
                });
            }
            _ => {}
        }
    }
    policies.sort_by(|a, b| a.order().cmp(&b.order()));
    let res = ctx.external.get(external).copied();
    let selects = |t: &TargetRef| match t.kind {
        TargetKind::Mesh => true,
        TargetKind::MeshExternalService => match (&t.name, &t.labels, res) {
            (Some(n), _, _) => n.0 == external,
            (None, Some(labels), Some(res)) => subset(Some(labels), &res.labels),
            _ => false,
        },
        _ => false,
    };
    let mut view = InboundView {
        port: 0,
        service: external.to_string(),
        ..InboundView::default()
    };
    let mut rules = None;
    let mut from: Vec<(u8, usize, FromEntry)> = Vec::new();
    for p in policies.iter().filter(|p| selects(&p.policy.target_ref)) {
        for rule in &p.policy.rules {
            merge_into(&mut rules, &rule.default);
        }
        for e in &p.policy.from {
            match from
                .iter_mut()
                .find(|(_, _, f)| f.target_ref == e.target_ref)
            {
                Some((_, _, f)) => merge(&mut f.conf, &e.default),
                None => {
                    let pos = from.len();
                    from.push((e.target_ref.kind.specificity(), pos, from_entry(e, &ctx)));
                }
            }
        }
    }
    if let Some(r) = rules {
        view.rules.insert(Kind::MeshTrafficPermission, r);
    }
    if !from.is_empty() {
        from.sort_by_key(|(s, pos, _)| (*s, *pos));
        view.from.insert(
            Kind::MeshTrafficPermission,
            from.into_iter().map(|(_, _, f)| f).collect(),
        );
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_objects_by_key_and_replaces_the_rest() {
        let mut base = json!({"a": 1, "o": {"x": 1, "y": 2}, "l": [1, 2]});
        merge(
            &mut base,
            &json!({"o": {"y": 3, "z": 4}, "l": [9], "b": true}),
        );
        assert_eq!(
            base,
            json!({"a": 1, "o": {"x": 1, "y": 3, "z": 4}, "l": [9], "b": true})
        );
    }

    #[test]
    fn route_rules_with_equal_matches_merge_others_append() {
        let mut acc = None;
        merge_route_rules(
            &mut acc,
            &[json!({"matches": [{"method": "GET"}], "default": {"backendRefs": [1]}})],
        );
        merge_route_rules(
            &mut acc,
            &[
                json!({"matches": [{"method": "GET"}], "default": {"filters": [2]}}),
                json!({"matches": [{"method": "POST"}], "default": {"backendRefs": [3]}}),
            ],
        );
        assert_eq!(
            acc.unwrap(),
            json!({"rules": [
                {"matches": [{"method": "GET"}], "default": {"backendRefs": [1], "filters": [2]}},
                {"matches": [{"method": "POST"}], "default": {"backendRefs": [3]}},
            ]})
        );
    }

    fn mk(kind: Kind, name: &str, spec: Value) -> Resource {
        Resource::new(kind, Some("shop"), name, BTreeMap::new(), spec).unwrap()
    }

    #[test]
    fn external_permissions_most_specific_wins() {
        let ext = mk(
            Kind::MeshExternalService,
            "httpbin",
            json!({"match": {"type": "HostnameGenerator", "port": 80, "protocol": "http"},
                   "endpoints": [{"address": "httpbin.org", "port": 80}]}),
        );
        let allow_all = mk(
            Kind::MeshTrafficPermission,
            "allow-all",
            json!({"targetRef": {"kind": "Mesh"},
                   "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]}),
        );
        let deny_web = mk(
            Kind::MeshTrafficPermission,
            "deny-web",
            json!({"targetRef": {"kind": "MeshExternalService", "name": "httpbin"},
                   "from": [{"targetRef": {"kind": "MeshService", "name": "web"},
                             "default": {"action": "Deny"}}]}),
        );
        let other = mk(
            Kind::MeshTrafficPermission,
            "deny-other",
            json!({"targetRef": {"kind": "MeshExternalService", "name": "other"},
                   "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Deny"}}]}),
        );
        let none = BTreeMap::new();
        let all = [ext.clone(), allow_all.clone(), deny_web, other];
        let v = resolve_external("shop", "httpbin", Some("east"), &all).unwrap();
        assert_eq!(v.allows("web", &none, true), Action::Deny);
        assert_eq!(v.allows("api", &none, true), Action::Allow);
        // Without any policy: the mesh default.
        let v = resolve_external("shop", "httpbin", None, std::slice::from_ref(&ext)).unwrap();
        assert_eq!(v.allows("web", &none, true), Action::Deny);
        assert_eq!(v.allows("web", &none, false), Action::Allow);
        // Another mesh's policies do not count.
        let v = resolve_external("payments", "httpbin", None, &[ext, allow_all]).unwrap();
        assert!(v.from.is_empty());
    }

    #[test]
    fn a_permission_may_target_an_external_service() {
        let r = Resource::new(
            Kind::MeshTrafficPermission,
            Some("shop"),
            "x",
            BTreeMap::new(),
            json!({"targetRef": {"kind": "MeshExternalService", "name": "httpbin"},
                   "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]}),
        );
        assert!(r.is_ok(), "{r:?}");
    }
}
