//! The memory store: the embedded default. Everything behind one lock, so every write and
//! every `apply` batch is atomic and revisions are in commit order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::watch;

use super::{Count, Error, Event, ListQuery, Op, Outcome, Page, Result, Store, parse_page_token};
use crate::kind::Kind;
use crate::resource::{Key, Resource};

/// How many change-feed events the memory store keeps by default.
pub const DEFAULT_FEED_CAPACITY: usize = 200_000;

/// Resources are indexed by kind, then (mesh, name), so a list is an ordered range scan.
type Index = HashMap<Kind, BTreeMap<(String, String), Arc<Resource>>>;

struct State {
    resources: Index,
    events: VecDeque<Event>,
    revision: u64,
    system: HashMap<String, String>,
}

pub struct Memory {
    state: Mutex<State>,
    feed_capacity: usize,
    tx: watch::Sender<u64>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory::new()
    }
}

impl Memory {
    pub fn new() -> Memory {
        Memory::with_feed_capacity(DEFAULT_FEED_CAPACITY)
    }

    /// A store that keeps only the last `cap` change-feed events.
    pub fn with_feed_capacity(cap: usize) -> Memory {
        let (tx, _) = watch::channel(0);
        Memory {
            state: Mutex::new(State {
                resources: HashMap::new(),
                events: VecDeque::new(),
                revision: 0,
                system: HashMap::new(),
            }),
            feed_capacity: cap.max(1),
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (writes are applied last).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, revision: u64) {
        self.tx.send_replace(revision);
    }
}

fn slot(key: &Key) -> (String, String) {
    (key.mesh_str().to_string(), key.name.clone())
}

impl State {
    fn get(&self, key: &Key) -> Option<&Resource> {
        self.resources.get(&key.kind)?.get(&slot(key)).map(|r| &**r)
    }

    fn record(
        &mut self,
        cap: usize,
        op: Op,
        key: Key,
        version: u64,
        resource: Option<Arc<Resource>>,
    ) {
        self.revision += 1;
        self.events.push_back(Event {
            revision: self.revision,
            op,
            key,
            version,
            resource,
        });
        while self.events.len() > cap {
            self.events.pop_front();
        }
    }

    fn put(&mut self, cap: usize, r: Resource, op: Op) {
        let key = r.key();
        let version = r.meta.version;
        let r = Arc::new(r);
        self.resources
            .entry(key.kind)
            .or_default()
            .insert(slot(&key), r.clone());
        self.record(cap, op, key, version, Some(r));
    }

    fn remove(&mut self, cap: usize, key: &Key) -> Option<Arc<Resource>> {
        let r = self.resources.get_mut(&key.kind)?.remove(&slot(key))?;
        self.record(cap, Op::Delete, key.clone(), r.meta.version, None);
        Some(r)
    }

    /// What a create-or-update of `r` would produce, without writing.
    fn plan(&self, mut r: Resource) -> Outcome {
        let now = Utc::now();
        match self.get(&r.key()) {
            None => {
                r.meta.version = 1;
                r.meta.creation_time = Some(now);
                r.meta.modification_time = Some(now);
                Outcome::Created(r)
            }
            Some(cur) if cur.same_content(&r) => Outcome::Unchanged(cur.clone()),
            Some(cur) => {
                r.meta.version = cur.meta.version + 1;
                r.meta.creation_time = cur.meta.creation_time;
                r.meta.modification_time = Some(now);
                Outcome::Updated(r)
            }
        }
    }
}

#[async_trait]
impl Store for Memory {
    async fn get(&self, key: &Key) -> Result<Option<Resource>> {
        Ok(self.lock().get(key).cloned())
    }

    async fn list(&self, q: &ListQuery) -> Result<Page> {
        let after = q.after.as_deref().map(parse_page_token).transpose()?;
        let st = self.lock();
        let Some(by_key) = st.resources.get(&q.kind) else {
            return Ok(Page::default());
        };
        let limit = q.limit.unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let range = match &after {
            Some(a) => by_key.range((
                std::ops::Bound::Excluded(a.clone()),
                std::ops::Bound::Unbounded,
            )),
            None => by_key.range(..),
        };
        let mut more = false;
        for ((mesh, _), r) in range {
            if q.mesh.as_ref().is_some_and(|m| m != mesh) || !q.selector.matches(&r.labels) {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(Resource::clone(r));
        }
        let next = if more {
            items.last().map(super::page_token)
        } else {
            None
        };
        Ok(Page { items, next })
    }

    async fn create(&self, mut r: Resource) -> Result<Resource> {
        let rev = {
            let mut st = self.lock();
            let key = r.key();
            if st.get(&key).is_some() {
                return Err(Error::AlreadyExists(key));
            }
            let now = Utc::now();
            r.meta.version = 1;
            r.meta.creation_time = Some(now);
            r.meta.modification_time = Some(now);
            st.put(self.feed_capacity, r.clone(), Op::Create);
            st.revision
        };
        self.publish(rev);
        Ok(r)
    }

    async fn update(&self, mut r: Resource, expected_version: u64) -> Result<Resource> {
        let rev = {
            let mut st = self.lock();
            let key = r.key();
            let cur = st.get(&key).ok_or_else(|| Error::NotFound(key.clone()))?;
            if cur.meta.version != expected_version {
                return Err(Error::Conflict {
                    key,
                    expected: expected_version,
                    current: cur.meta.version,
                });
            }
            r.meta.version = cur.meta.version + 1;
            r.meta.creation_time = cur.meta.creation_time;
            r.meta.modification_time = Some(Utc::now());
            st.put(self.feed_capacity, r.clone(), Op::Update);
            st.revision
        };
        self.publish(rev);
        Ok(r)
    }

    async fn delete(&self, key: &Key, expected_version: Option<u64>) -> Result<()> {
        let rev = {
            let mut st = self.lock();
            let cur = st.get(key).ok_or_else(|| Error::NotFound(key.clone()))?;
            if let Some(v) = expected_version
                && cur.meta.version != v
            {
                return Err(Error::Conflict {
                    key: key.clone(),
                    expected: v,
                    current: cur.meta.version,
                });
            }
            if key.kind == Kind::Mesh {
                let inside: Vec<Key> = st
                    .resources
                    .values()
                    .flat_map(|m| m.values())
                    .filter(|r| r.mesh.as_deref() == Some(key.name.as_str()))
                    .map(|r| r.key())
                    .collect();
                for k in inside {
                    st.remove(self.feed_capacity, &k);
                }
            }
            st.remove(self.feed_capacity, key);
            st.revision
        };
        self.publish(rev);
        Ok(())
    }

    async fn apply(&self, resources: Vec<Resource>, dry_run: bool) -> Result<Vec<Outcome>> {
        let (outcomes, rev) = {
            let mut st = self.lock();
            let mut outcomes = Vec::with_capacity(resources.len());
            for r in resources {
                let outcome = st.plan(r);
                if !dry_run {
                    match &outcome {
                        Outcome::Created(r) => st.put(self.feed_capacity, r.clone(), Op::Create),
                        Outcome::Updated(r) => st.put(self.feed_capacity, r.clone(), Op::Update),
                        Outcome::Unchanged(_) => {}
                    }
                }
                outcomes.push(outcome);
            }
            (outcomes, st.revision)
        };
        if !dry_run {
            self.publish(rev);
        }
        Ok(outcomes)
    }

    async fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        let st = self.lock();
        if since >= st.revision {
            return Ok(Vec::new());
        }
        let oldest = st.events.front().map_or(st.revision + 1, |e| e.revision);
        if since + 1 < oldest {
            return Err(Error::Compacted { since, oldest });
        }
        let skip = (since + 1 - oldest) as usize;
        Ok(st.events.iter().skip(skip).take(limit).cloned().collect())
    }

    async fn revision(&self) -> Result<u64> {
        Ok(self.lock().revision)
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    async fn counts(&self) -> Result<Vec<Count>> {
        let st = self.lock();
        let mut counts: BTreeMap<(Kind, String), u64> = BTreeMap::new();
        for (kind, by_key) in &st.resources {
            for (mesh, _) in by_key.keys() {
                *counts.entry((*kind, mesh.clone())).or_default() += 1;
            }
        }
        Ok(counts
            .into_iter()
            .map(|((kind, mesh), count)| Count {
                kind,
                mesh: (!mesh.is_empty()).then_some(mesh),
                count,
            })
            .collect())
    }

    async fn system_get(&self, key: &str) -> Result<Option<String>> {
        Ok(self.lock().system.get(key).cloned())
    }

    async fn system_init(&self, key: &str, value: &str) -> Result<String> {
        Ok(self
            .lock()
            .system
            .entry(key.to_string())
            .or_insert_with(|| value.to_string())
            .clone())
    }

    async fn system_set(&self, key: &str, value: &str) -> Result<()> {
        self.lock()
            .system
            .insert(key.to_string(), value.to_string());
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod conformance {
    use super::Memory;
    crate::store_conformance_tests!(async { Box::new(Memory::new()) });
}
