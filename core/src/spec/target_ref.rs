//! The `targetRef` model: what a policy (or one of its `to`/`from` entries) points at.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::{Invalid, Name, join};

/// What a `targetRef` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TargetKind {
    Mesh,
    Dataplane,
    MeshSubset,
    MeshService,
    MeshServiceSubset,
    MeshExternalService,
    #[serde(rename = "MeshHTTPRoute")]
    MeshHttpRoute,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Mesh => "Mesh",
            TargetKind::Dataplane => "Dataplane",
            TargetKind::MeshSubset => "MeshSubset",
            TargetKind::MeshService => "MeshService",
            TargetKind::MeshServiceSubset => "MeshServiceSubset",
            TargetKind::MeshExternalService => "MeshExternalService",
            TargetKind::MeshHttpRoute => "MeshHTTPRoute",
        }
    }

    /// How specific a reference is: a more specific policy wins when merging.
    pub fn specificity(self) -> u8 {
        match self {
            TargetKind::Mesh => 0,
            TargetKind::MeshSubset => 1,
            TargetKind::MeshService | TargetKind::MeshExternalService => 2,
            TargetKind::MeshServiceSubset => 3,
            TargetKind::Dataplane => 4,
            TargetKind::MeshHttpRoute => 5,
        }
    }
}

/// A reference to the resources a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    pub kind: TargetKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// Dataplane tags, for `MeshSubset` and `MeshServiceSubset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// Resource labels, for `Dataplane`, `MeshService` and `MeshExternalService` by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Port name or number section, for `MeshService` and `Dataplane`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

impl TargetRef {
    pub fn mesh() -> TargetRef {
        TargetRef {
            kind: TargetKind::Mesh,
            name: None,
            tags: None,
            labels: None,
            section_name: None,
        }
    }

    pub fn service(name: &str) -> TargetRef {
        TargetRef {
            kind: TargetKind::MeshService,
            name: Some(Name(name.to_string())),
            ..TargetRef::mesh()
        }
    }

    /// Check the reference is well formed and its kind is one of `allowed` at `path`.
    pub fn check(&self, path: &str, allowed: &[TargetKind], errs: &mut Invalid) {
        let kind_path = join(path, "kind");
        if !allowed.contains(&self.kind) {
            let names: Vec<&str> = allowed.iter().map(|k| k.name()).collect();
            errs.add(
                kind_path,
                format!(
                    "{} is not allowed here (allowed: {})",
                    self.kind.name(),
                    names.join(", ")
                ),
            );
            return;
        }
        let has_name = self.name.is_some();
        let has_tags = self.tags.as_ref().is_some_and(|t| !t.is_empty());
        let has_labels = self.labels.as_ref().is_some_and(|l| !l.is_empty());
        match self.kind {
            TargetKind::Mesh => {
                for (field, set) in [
                    ("name", has_name),
                    ("tags", has_tags),
                    ("labels", has_labels),
                ] {
                    if set {
                        errs.add(join(path, field), "not allowed with kind Mesh (remove it)");
                    }
                }
            }
            TargetKind::MeshSubset => {
                if !has_tags {
                    errs.add(
                        join(path, "tags"),
                        "required with kind MeshSubset (e.g. tags: {version: v2})",
                    );
                }
                if has_name {
                    errs.add(
                        join(path, "name"),
                        "not allowed with kind MeshSubset (use tags)",
                    );
                }
            }
            TargetKind::MeshServiceSubset => {
                if !has_name {
                    errs.add(join(path, "name"), "required with kind MeshServiceSubset");
                }
                if !has_tags {
                    errs.add(
                        join(path, "tags"),
                        "required with kind MeshServiceSubset (e.g. tags: {version: v2})",
                    );
                }
            }
            TargetKind::MeshService | TargetKind::MeshExternalService | TargetKind::Dataplane => {
                if has_name == has_labels {
                    errs.add(
                        join(path, "name"),
                        format!("{} needs exactly one of name or labels", self.kind.name()),
                    );
                }
                if has_tags {
                    errs.add(
                        join(path, "tags"),
                        format!(
                            "not allowed with kind {} (use MeshSubset)",
                            self.kind.name()
                        ),
                    );
                }
            }
            TargetKind::MeshHttpRoute => {
                if !has_name {
                    errs.add(join(path, "name"), "required with kind MeshHTTPRoute");
                }
            }
        }
    }
}
