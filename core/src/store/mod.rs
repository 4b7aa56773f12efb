//! The `Store` trait every backend implements (memory here, PostgreSQL in `weft-global`,
//! later raft and Kubernetes in `weft-zone`), its error type, and the change feed model.
//!
//! Two numbers matter: each resource's `meta.version` (1 on create, +1 on every change; the
//! optimistic-concurrency token) and the store's **revision**, a counter that every change
//! increments by one, in commit order. The change feed is "events with revision > R": a
//! consumer remembers the last revision it saw and asks again after any disconnect.

pub mod conformance;
pub mod memory;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::kind::Kind;
use crate::resource::{Key, Resource};
use crate::selector::Selector;
use crate::validate::Invalid;

pub use memory::Memory;

/// Store errors tell the caller what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The resource does not exist.
    #[error("{0} not found")]
    NotFound(Key),
    /// The resource changed since the caller read it: read again and retry.
    #[error(
        "{key} was modified: expected version {expected}, current version is {current} (get it again and retry)"
    )]
    Conflict {
        key: Key,
        expected: u64,
        current: u64,
    },
    /// A create found the resource there already.
    #[error("{0} already exists")]
    AlreadyExists(Key),
    /// Permanent: the request can never succeed as it is (report and skip).
    #[error("{0}")]
    Invalid(Invalid),
    /// The change feed no longer holds events after this revision: list again to resync.
    #[error(
        "change feed compacted: revision {since} is older than the oldest kept ({oldest}); list again to resync"
    )]
    Compacted { since: u64, oldest: u64 },
    /// Transient: the backend failed or is unreachable; retry later.
    #[error("store unavailable: {0}")]
    Backend(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to list.
#[derive(Clone, Debug)]
pub struct ListQuery {
    pub kind: Kind,
    /// `None`: every mesh (or the global scope for global-scoped kinds).
    pub mesh: Option<String>,
    pub selector: Selector,
    /// Page size; `None` for everything.
    pub limit: Option<usize>,
    /// The `next` token of the previous page.
    pub after: Option<String>,
}

impl ListQuery {
    pub fn all(kind: Kind) -> ListQuery {
        ListQuery {
            kind,
            mesh: None,
            selector: Selector::default(),
            limit: None,
            after: None,
        }
    }

    pub fn in_mesh(kind: Kind, mesh: &str) -> ListQuery {
        ListQuery {
            mesh: Some(mesh.to_string()),
            ..ListQuery::all(kind)
        }
    }
}

/// One page of a list, ordered by (mesh, name). `next` is set when more may follow.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub items: Vec<Resource>,
    pub next: Option<String>,
}

/// The continuation token after `r`: keyset pagination on (mesh, name), stable under
/// concurrent inserts and deletes.
pub fn page_token(r: &Resource) -> String {
    format!("{}/{}", r.mesh.as_deref().unwrap_or(""), r.name)
}

/// Split a page token into (mesh, name).
pub fn parse_page_token(token: &str) -> Result<(String, String)> {
    token
        .split_once('/')
        .map(|(m, n)| (m.to_string(), n.to_string()))
        .ok_or_else(|| {
            Error::Invalid(Invalid::one(
                "next",
                format!(
                    "invalid page token {token:?} (pass the `next` value of the previous page)"
                ),
            ))
        })
}

/// What a change was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Create,
    Update,
    Delete,
}

/// One entry of the change feed.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub revision: u64,
    pub op: Op,
    pub key: Key,
    /// The resource's version after the change (for a delete: the version deleted).
    pub version: u64,
    /// The resource after the change; `None` for deletes. Shared with the store's own copy
    /// where the backend keeps one (the memory store), so the feed costs no second copy.
    pub resource: Option<std::sync::Arc<Resource>>,
}

/// What `apply` did to one resource.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Created(Resource),
    Updated(Resource),
    Unchanged(Resource),
}

impl Outcome {
    pub fn resource(&self) -> &Resource {
        match self {
            Outcome::Created(r) | Outcome::Updated(r) | Outcome::Unchanged(r) => r,
        }
    }

    pub fn action(&self) -> &'static str {
        match self {
            Outcome::Created(_) => "created",
            Outcome::Updated(_) => "updated",
            Outcome::Unchanged(_) => "unchanged",
        }
    }
}

/// Resource count for one kind in one mesh (`mesh` is `None` for global-scoped kinds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Count {
    pub kind: Kind,
    pub mesh: Option<String>,
    pub count: u64,
}

/// A resource store. All writes are atomic; `apply` is atomic over its whole batch.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &Key) -> Result<Option<Resource>>;

    async fn list(&self, query: &ListQuery) -> Result<Page>;

    /// Create a resource; `AlreadyExists` if it is there. Returns it with version 1.
    async fn create(&self, resource: Resource) -> Result<Resource>;

    /// Replace a resource if its current version is `expected_version`, else `Conflict`
    /// (`NotFound` if it is gone). Returns it with the next version.
    async fn update(&self, resource: Resource, expected_version: u64) -> Result<Resource>;

    /// Delete a resource, only at `expected_version` when given. Deleting a `Mesh` deletes
    /// every resource in it, in the same transaction.
    async fn delete(&self, key: &Key, expected_version: Option<u64>) -> Result<()>;

    /// Create or update every resource in one transaction: all or nothing. A resource whose
    /// labels and spec are unchanged keeps its version. With `dry_run`, nothing is written
    /// and the outcomes say what would happen.
    async fn apply(&self, resources: Vec<Resource>, dry_run: bool) -> Result<Vec<Outcome>>;

    /// The change feed: events with revision > `since`, oldest first, at most `limit`.
    /// `Compacted` when events after `since` are no longer kept.
    async fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>>;

    /// The current revision (0 for an empty, new store).
    async fn revision(&self) -> Result<u64>;

    /// The latest revision as it changes: wakes consumers of the change feed, including for
    /// changes written by other processes sharing the backend.
    fn watch(&self) -> watch::Receiver<u64>;

    /// Resource counts by kind and mesh (kinds with no resources are left out).
    async fn counts(&self) -> Result<Vec<Count>>;

    /// Read a system value (secrets and settings of the control plane itself).
    async fn system_get(&self, key: &str) -> Result<Option<String>>;

    /// Store `value` under `key` unless a value is there; return the value stored. Safe for
    /// several replicas starting at once: they all end up with the same value.
    async fn system_init(&self, key: &str, value: &str) -> Result<String>;

    /// Set a system value, replacing any.
    async fn system_set(&self, key: &str, value: &str) -> Result<()>;

    /// Check the backend is reachable.
    async fn ping(&self) -> Result<()>;
}

/// Every resource a query matches, read page by page (pages of `query.limit`, default 5,000).
pub async fn list_all(store: &dyn Store, mut query: ListQuery) -> Result<Vec<Resource>> {
    query.limit = Some(query.limit.unwrap_or(5_000));
    let mut out = Vec::new();
    loop {
        let page = store.list(&query).await?;
        out.extend(page.items);
        match page.next {
            Some(n) => query.after = Some(n),
            None => return Ok(out),
        }
    }
}

/// Sum counts per mesh: `mesh -> kind -> count`, for `inspect meshes`.
pub fn counts_by_mesh(counts: &[Count]) -> BTreeMap<String, BTreeMap<Kind, u64>> {
    let mut out: BTreeMap<String, BTreeMap<Kind, u64>> = BTreeMap::new();
    for c in counts {
        if let Some(m) = &c.mesh {
            *out.entry(m.clone()).or_default().entry(c.kind).or_default() += c.count;
        }
    }
    out
}
