//! A resource: kind, name, mesh, labels, a validated spec, and store-managed meta.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::kind::{Kind, Scope};
use crate::validate::{Invalid, check_dns_label, check_label};

/// Identifies one resource: kind, mesh (`None` for global-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    pub mesh: Option<String>,
    pub name: String,
}

impl Key {
    pub fn new(kind: Kind, mesh: Option<&str>, name: &str) -> Key {
        Key {
            kind,
            mesh: mesh.map(str::to_string),
            name: name.to_string(),
        }
    }

    /// The mesh as stored: the empty string for global-scoped kinds.
    pub fn mesh_str(&self) -> &str {
        self.mesh.as_deref().unwrap_or("")
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mesh {
            Some(m) => write!(f, "{} {:?} in mesh {:?}", self.kind, self.name, m),
            None => write!(f, "{} {:?}", self.kind, self.name),
        }
    }
}

/// What the store manages: the version for optimistic concurrency (1 on create, +1 on every
/// change), and creation and modification times.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub version: u64,
    pub creation_time: Option<DateTime<Utc>>,
    pub modification_time: Option<DateTime<Utc>>,
}

/// A validated resource. `spec` is in canonical form (what the typed spec serializes to), so
/// two resources with equal specs compare equal whatever their input spelling was.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub kind: Kind,
    pub mesh: Option<String>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub spec: Value,
    pub meta: Meta,
}

impl Resource {
    /// Build and validate a resource from parts; the spec is checked against the kind's
    /// typed spec and put in canonical form.
    pub fn new(
        kind: Kind,
        mesh: Option<&str>,
        name: &str,
        labels: BTreeMap<String, String>,
        spec: Value,
    ) -> Result<Resource, Invalid> {
        let mut errs = Invalid::default();
        if let Err(m) = check_dns_label(name) {
            errs.add("name", m);
        }
        match (kind.scope(), mesh) {
            (Scope::Mesh, None) => {
                errs.add("mesh", format!("required for {kind} (e.g. mesh: default)"))
            }
            (Scope::Mesh, Some(m)) => {
                if let Err(msg) = check_dns_label(m) {
                    errs.add("mesh", msg);
                }
            }
            (Scope::Global, Some(_)) => errs.add(
                "mesh",
                format!("not allowed: {kind} is not mesh-scoped (remove the field)"),
            ),
            (Scope::Global, None) => {}
        }
        for (k, v) in &labels {
            if let Err(m) = check_label(k, v) {
                errs.add(format!("labels.{k}"), m);
            }
        }
        let spec = match crate::spec::parse(kind, spec) {
            Ok(s) => Some(s),
            Err(e) => {
                errs.errors.extend(e.errors);
                None
            }
        };
        errs.into_result()?;
        Ok(Resource {
            kind,
            mesh: mesh.map(str::to_string),
            name: name.to_string(),
            labels,
            spec: spec.expect("spec parsed when no errors"),
            meta: Meta::default(),
        })
    }

    pub fn key(&self) -> Key {
        Key {
            kind: self.kind,
            mesh: self.mesh.clone(),
            name: self.name.clone(),
        }
    }

    /// True when `other` has the same user-controlled content (labels and spec).
    pub fn same_content(&self, other: &Resource) -> bool {
        self.labels == other.labels && self.spec == other.spec
    }
}
