//! weft-core: the resource model and everything pure.
//!
//! Resource kinds and their typed specs, validation with field paths, the YAML/JSON document
//! form, the `targetRef` model, label selectors, the [`store::Store`] trait with its memory
//! implementation and conformance suite. No network, no database, no Kubernetes: adapters live
//! in the crates that need them and implement the traits defined here.

pub mod document;
pub mod kds;
pub mod kind;
pub mod names;
pub mod pki;
pub mod policy;
pub mod resource;
pub mod selector;
pub mod spec;
pub mod store;
pub mod token;
pub mod validate;

pub use kind::{Kind, Owner, Scope};
pub use resource::{Key, Meta, Resource};
pub use validate::{FieldError, Invalid};

/// Label naming where a resource was written: `global` or `zone`.
pub const ORIGIN_LABEL: &str = "weft.io/origin";
/// Label naming the zone a zone-originated resource comes from.
pub const ZONE_LABEL: &str = "weft.io/zone";
/// The mesh created on first start.
pub const DEFAULT_MESH: &str = "default";
/// Label on resources a control plane generates and maintains itself (value: the component,
/// e.g. `weft-zone` on the MeshServices a zone derives from its dataplanes).
pub const MANAGED_BY_LABEL: &str = "weft.io/managed-by";
