//! KDS sync logic, sans-I/O: which kinds flow which way, content hashes, name mapping, the
//! sender's reconciliation state machine ([`Sender`]: events in, actions out), and the
//! receiver's store-side steps. The gRPC streams that carry [`Msg`]s live in `weft-proto`.
//!
//! A stream has a **sender** (owns the resources) and a **receiver** (keeps copies). After
//! (re)connecting, the receiver announces what it holds ([`Inventory`], per kind, chunked);
//! the sender takes a snapshot of its store (revision `R`, then a list), sends the difference
//! (upserts and deletes, chunked into [`Batch`]es, the last one `synced`) and from then on
//! follows its change feed from `R`. Because the revision is read before the list, every
//! change made during the snapshot shows up in the feed; content hashes make re-sending it
//! harmless. The sender remembers what the receiver holds (`known`) so unchanged updates are
//! not sent and deletes of things the receiver never had are skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::kind::{Kind, Owner, Scope};
use crate::resource::{Key, Resource};
use crate::store::{self, Event, ListQuery, Op, Store};
use crate::validate::{Invalid, check_dns_label};
use crate::{ORIGIN_LABEL, ZONE_LABEL};

/// Which way resources flow on a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Global-owned kinds (and other zones' ingresses) to a zone.
    GlobalToZone,
    /// A zone's own kinds to global.
    ZoneToGlobal,
}

/// The kinds a direction carries: the one table of what flows where.
pub fn kinds(dir: Direction) -> Vec<Kind> {
    Kind::ALL
        .iter()
        .copied()
        .filter(|k| match dir {
            // Zones need other zones' ingresses and services (with their instance counts:
            // the per-service availability) to route cross-zone traffic.
            Direction::GlobalToZone => {
                k.owner() == Owner::Global || matches!(k, Kind::ZoneIngress | Kind::MeshService)
            }
            Direction::ZoneToGlobal => k.owner() == Owner::Zone,
        })
        .collect()
}

/// Which end of a stream this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Global,
    Zone,
}

/// One end's view of a stream: direction, the zone on the other end (or this zone), and
/// which side we are. Decides what belongs to the stream and how names map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    pub dir: Direction,
    pub zone: String,
    pub side: Side,
}

impl Stream {
    pub fn new(dir: Direction, zone: &str, side: Side) -> Stream {
        Stream {
            dir,
            zone: zone.to_string(),
            side,
        }
    }

    pub fn kinds(&self) -> Vec<Kind> {
        kinds(self.dir)
    }

    /// Does a stored resource with these labels travel on this stream?
    pub fn belongs(&self, kind: Kind, labels: &BTreeMap<String, String>) -> bool {
        let zone = labels.get(ZONE_LABEL).map(String::as_str);
        match self.dir {
            Direction::GlobalToZone if kind.owner() == Owner::Zone => {
                zone.is_some_and(|z| z != self.zone)
            }
            Direction::GlobalToZone => true,
            Direction::ZoneToGlobal => zone == Some(self.zone.as_str()),
        }
    }

    /// The name a stored resource travels under. Global keeps a zone's resources as
    /// `<name>.<zone>` (names are unique per zone, not across zones).
    pub fn wire_name<'a>(&self, stored: &'a str) -> &'a str {
        if self.side == Side::Global && self.dir == Direction::ZoneToGlobal {
            stored
                .strip_suffix(&format!(".{}", self.zone))
                .unwrap_or(stored)
        } else {
            stored
        }
    }

    /// The name a received resource is stored under.
    pub fn stored_name(&self, wire: &str) -> String {
        if self.side == Side::Global && self.dir == Direction::ZoneToGlobal {
            format!("{wire}.{}", self.zone)
        } else {
            wire.to_string()
        }
    }

    /// The query listing what this end holds of `kind` for this stream.
    fn query(&self, kind: Kind) -> ListQuery {
        let mut q = ListQuery::all(kind);
        if self.dir == Direction::ZoneToGlobal {
            q.selector = format!("{ZONE_LABEL}={}", self.zone)
                .parse()
                .expect("valid selector");
        }
        q
    }
}

/// A content hash: what a copy holds, independent of store-managed meta and of the
/// `weft.io/` labels each end stamps for itself.
pub type Hash = [u8; 16];

pub fn content_hash(labels: &BTreeMap<String, String>, spec: &Value) -> Hash {
    let mut h = Sha256::new();
    for (k, v) in labels.iter().filter(|(k, _)| !k.starts_with("weft.io/")) {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    h.update([1]);
    h.update(spec.to_string().as_bytes());
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

fn hash_of(r: &Resource) -> Hash {
    content_hash(&r.labels, &r.spec)
}

/// (mesh, name) as they travel; mesh is `""` for global-scoped kinds.
pub type WireKey = (String, String);

#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    pub zone: String,
    pub version: String,
    pub instance: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: WireKey,
    pub hash: Hash,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Inventory {
    pub kind: Kind,
    pub entries: Vec<Entry>,
    pub last: bool,
}

/// A resource as it travels: wire name, labels, canonical spec, the sender's version.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub key: WireKey,
    pub labels: BTreeMap<String, String>,
    pub spec: Value,
    pub version: u64,
    /// When it last changed at the sender (unix milliseconds), for the sync-lag metric.
    pub modified_ms: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub nonce: u64,
    pub kind: Kind,
    pub upserts: Vec<Item>,
    pub deletes: Vec<WireKey>,
    pub synced: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ack {
    pub nonce: u64,
    pub nack: Option<String>,
}

/// Everything a KDS stream carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    Hello(Hello),
    Inventory(Inventory),
    Batch(Batch),
    Ack(Ack),
    Ping(u64),
    Pong(u64),
}

/// What the I/O loop must do for the sender.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Send(Msg),
    /// Read the store's revision, then list every kind of the stream, and call
    /// [`Sender::on_snapshot`] (see [`snapshot`]).
    Snapshot,
    /// From now on read the change feed after this revision whenever the store changes, and
    /// call [`Sender::on_events`].
    Follow(u64),
    /// The receiver refused a batch (counted; later batches go on).
    Nacked {
        kind: Kind,
        reason: String,
    },
}

/// Per-kind counters, for metrics and the zone insight.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KindStats {
    /// Resources sent (upserts and deletes).
    pub sent: u64,
    pub acked: u64,
    pub nacked: u64,
    pub last_nack: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the receiver's inventory of every kind.
    Inventory,
    /// Waiting for the I/O loop's snapshot.
    Snapshot,
    /// Following the change feed.
    Live,
}

struct InFlight {
    kind: Kind,
    items: u64,
    upserted: Vec<WireKey>,
}

/// The sending end's reconciliation state machine.
pub struct Sender {
    stream: Stream,
    kinds: Vec<Kind>,
    max_batch_bytes: usize,
    phase: Phase,
    pending: HashMap<Kind, HashMap<WireKey, Hash>>,
    complete: HashSet<Kind>,
    /// What the receiver holds, as far as this sender knows.
    known: HashMap<Kind, HashMap<WireKey, Hash>>,
    cursor: u64,
    next_nonce: u64,
    in_flight: HashMap<u64, InFlight>,
    stats: BTreeMap<Kind, KindStats>,
}

/// Default upper bound of one batch's payload; a kind with more is split.
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Entries per inventory message.
pub const INVENTORY_CHUNK: usize = 20_000;

impl Sender {
    pub fn new(stream: Stream, max_batch_bytes: usize) -> Sender {
        let kinds = stream.kinds();
        Sender {
            stream,
            kinds,
            max_batch_bytes: max_batch_bytes.max(1),
            phase: Phase::Inventory,
            pending: HashMap::new(),
            complete: HashSet::new(),
            known: HashMap::new(),
            cursor: 0,
            next_nonce: 1,
            in_flight: HashMap::new(),
            stats: BTreeMap::new(),
        }
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The last revision of the change feed this sender has seen.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// True once the receiver has been brought in sync and changes are followed.
    pub fn is_live(&self) -> bool {
        self.phase == Phase::Live
    }

    pub fn stats(&self) -> &BTreeMap<Kind, KindStats> {
        &self.stats
    }

    /// Batches sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.in_flight.len()
    }

    pub fn on_inventory(&mut self, inv: Inventory) -> Vec<Action> {
        if self.phase != Phase::Inventory || !self.kinds.contains(&inv.kind) {
            return Vec::new();
        }
        let held = self.pending.entry(inv.kind).or_default();
        held.extend(inv.entries.into_iter().map(|e| (e.key, e.hash)));
        if inv.last {
            self.complete.insert(inv.kind);
        }
        if self.kinds.iter().all(|k| self.complete.contains(k)) {
            self.known = std::mem::take(&mut self.pending);
            self.phase = Phase::Snapshot;
            return vec![Action::Snapshot];
        }
        Vec::new()
    }

    /// Start over from a snapshot (after the change feed was compacted under us).
    pub fn resync(&mut self) -> Vec<Action> {
        if self.phase == Phase::Inventory {
            return Vec::new();
        }
        self.phase = Phase::Snapshot;
        vec![Action::Snapshot]
    }

    /// The snapshot: the store's revision read *before* listing, and the stream's resources.
    pub fn on_snapshot(&mut self, revision: u64, resources: Vec<Resource>) -> Vec<Action> {
        if self.phase != Phase::Snapshot {
            return Vec::new();
        }
        let mut by_kind: HashMap<Kind, HashMap<WireKey, Resource>> = HashMap::new();
        for r in resources {
            if self.kinds.contains(&r.kind) && self.stream.belongs(r.kind, &r.labels) {
                let key = self.wire_key(&r);
                by_kind.entry(r.kind).or_default().insert(key, r);
            }
        }
        let mut out = Vec::new();
        for kind in self.kinds.clone() {
            let have = by_kind.remove(&kind).unwrap_or_default();
            let known = self.known.get(&kind);
            let mut upserts: Vec<Resource> = have
                .iter()
                .filter(|(k, r)| known.and_then(|m| m.get(*k)) != Some(&hash_of(r)))
                .map(|(_, r)| r.clone())
                .collect();
            upserts.sort_by(|a, b| (&a.mesh, &a.name).cmp(&(&b.mesh, &b.name)));
            let mut deletes: Vec<WireKey> = known
                .map(|m| {
                    m.keys()
                        .filter(|k| !have.contains_key(*k))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            deletes.sort();
            out.extend(self.batches(kind, upserts, deletes));
        }
        // Mark the end of the reconciliation on the last batch (an empty one if none).
        match out.iter_mut().rev().find_map(|a| match a {
            Action::Send(Msg::Batch(b)) => Some(b),
            _ => None,
        }) {
            Some(b) => b.synced = true,
            None => {
                let kind = self.kinds[0];
                let nonce = self.nonce(kind, 0, Vec::new());
                out.push(Action::Send(Msg::Batch(Batch {
                    nonce,
                    kind,
                    upserts: Vec::new(),
                    deletes: Vec::new(),
                    synced: true,
                })));
            }
        }
        self.cursor = self.cursor.max(revision);
        self.phase = Phase::Live;
        out.push(Action::Follow(self.cursor));
        out
    }

    /// Change-feed events after the cursor (others are ignored, so re-reads are harmless).
    pub fn on_events(&mut self, events: Vec<Event>) -> Vec<Action> {
        if self.phase != Phase::Live {
            return Vec::new();
        }
        // Last event per key wins; keep kinds in table order.
        let mut latest: BTreeMap<(usize, WireKey), Event> = BTreeMap::new();
        for e in events {
            if e.revision <= self.cursor {
                continue;
            }
            self.cursor = e.revision;
            let Some(pos) = self.kinds.iter().position(|k| *k == e.key.kind) else {
                continue;
            };
            let key = (
                e.key.mesh.clone().unwrap_or_default(),
                self.stream.wire_name(&e.key.name).to_string(),
            );
            latest.insert((pos, key), e);
        }
        let mut per_kind: BTreeMap<usize, (Vec<Resource>, Vec<WireKey>)> = BTreeMap::new();
        for ((pos, key), e) in latest {
            let kind = self.kinds[pos];
            let known = self.known.get(&kind).and_then(|m| m.get(&key)).copied();
            let entry = per_kind.entry(pos).or_default();
            match (e.op, e.resource) {
                (Op::Create | Op::Update, Some(r)) if self.stream.belongs(kind, &r.labels) => {
                    if known != Some(hash_of(&r)) {
                        entry.0.push(Arc::unwrap_or_clone(r));
                    }
                }
                _ => {
                    if known.is_some() {
                        entry.1.push(key);
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (pos, (upserts, deletes)) in per_kind {
            out.extend(self.batches(self.kinds[pos], upserts, deletes));
        }
        out
    }

    pub fn on_ack(&mut self, ack: Ack) -> Vec<Action> {
        let Some(f) = self.in_flight.remove(&ack.nonce) else {
            return Vec::new();
        };
        let stats = self.stats.entry(f.kind).or_default();
        match ack.nack {
            None => {
                stats.acked += f.items;
                Vec::new()
            }
            Some(reason) => {
                stats.nacked += f.items;
                stats.last_nack = Some(reason.clone());
                // The receiver kept what it had: forget what we thought it now holds, so
                // the next change (or reconnect) sends those resources again.
                if let Some(known) = self.known.get_mut(&f.kind) {
                    for k in &f.upserted {
                        known.remove(k);
                    }
                }
                vec![Action::Nacked {
                    kind: f.kind,
                    reason,
                }]
            }
        }
    }

    fn wire_key(&self, r: &Resource) -> WireKey {
        (
            r.mesh.clone().unwrap_or_default(),
            self.stream.wire_name(&r.name).to_string(),
        )
    }

    fn nonce(&mut self, kind: Kind, items: u64, upserted: Vec<WireKey>) -> u64 {
        let n = self.next_nonce;
        self.next_nonce += 1;
        self.in_flight.insert(
            n,
            InFlight {
                kind,
                items,
                upserted,
            },
        );
        n
    }

    /// Split changes into batches of at most `max_batch_bytes` (a single larger resource
    /// still travels alone), recording what the receiver will hold.
    fn batches(
        &mut self,
        kind: Kind,
        upserts: Vec<Resource>,
        deletes: Vec<WireKey>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let mut items: Vec<Item> = Vec::new();
        let mut dels: Vec<WireKey> = Vec::new();
        let mut size = 0usize;
        let flush = |this: &mut Sender,
                     items: &mut Vec<Item>,
                     dels: &mut Vec<WireKey>,
                     out: &mut Vec<Action>| {
            if items.is_empty() && dels.is_empty() {
                return;
            }
            let upserted: Vec<WireKey> = items.iter().map(|i| i.key.clone()).collect();
            let count = (items.len() + dels.len()) as u64;
            let nonce = this.nonce(kind, count, upserted);
            this.stats.entry(kind).or_default().sent += count;
            out.push(Action::Send(Msg::Batch(Batch {
                nonce,
                kind,
                upserts: std::mem::take(items),
                deletes: std::mem::take(dels),
                synced: false,
            })));
        };
        for r in upserts {
            let key = self.wire_key(&r);
            let hash = hash_of(&r);
            let item = Item {
                key: key.clone(),
                labels: r.labels,
                spec: r.spec,
                version: r.meta.version,
                modified_ms: r.meta.modification_time.map_or(0, |t| t.timestamp_millis()),
            };
            let item_size = estimate(&item);
            if size + item_size > self.max_batch_bytes && (!items.is_empty() || !dels.is_empty()) {
                flush(self, &mut items, &mut dels, &mut out);
                size = 0;
            }
            size += item_size;
            self.known.entry(kind).or_default().insert(key, hash);
            items.push(item);
        }
        for key in deletes {
            let item_size = key.0.len() + key.1.len() + 8;
            if size + item_size > self.max_batch_bytes && (!items.is_empty() || !dels.is_empty()) {
                flush(self, &mut items, &mut dels, &mut out);
                size = 0;
            }
            size += item_size;
            if let Some(m) = self.known.get_mut(&kind) {
                m.remove(&key);
            }
            dels.push(key);
        }
        flush(self, &mut items, &mut dels, &mut out);
        out
    }
}

/// Bytes an item takes on the wire, roughly.
fn estimate(i: &Item) -> usize {
    let labels: usize = i.labels.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    i.key.0.len() + i.key.1.len() + labels + i.spec.to_string().len() + 16
}

// ---------------------------------------------------------------------------------------
// Store-side steps shared by both ends (they use only the `Store` trait).

/// The receiver's inventory of every kind of the stream, chunked into messages.
pub async fn inventory(store: &dyn Store, stream: &Stream) -> store::Result<Vec<Msg>> {
    let mut out = Vec::new();
    for kind in stream.kinds() {
        let entries: Vec<Entry> = store::list_all(store, stream.query(kind))
            .await?
            .iter()
            .filter(|r| stream.belongs(kind, &r.labels))
            .map(|r| Entry {
                key: (
                    r.mesh.clone().unwrap_or_default(),
                    stream.wire_name(&r.name).to_string(),
                ),
                hash: hash_of(r),
            })
            .collect();
        let mut chunks: Vec<Vec<Entry>> = entries
            .chunks(INVENTORY_CHUNK)
            .map(<[Entry]>::to_vec)
            .collect();
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let n = chunks.len();
        for (i, entries) in chunks.into_iter().enumerate() {
            out.push(Msg::Inventory(Inventory {
                kind,
                entries,
                last: i + 1 == n,
            }));
        }
    }
    Ok(out)
}

/// The sender's snapshot: revision first, then every resource of the stream.
pub async fn snapshot(store: &dyn Store, stream: &Stream) -> store::Result<(u64, Vec<Resource>)> {
    let revision = store.revision().await?;
    let mut out = Vec::new();
    for kind in stream.kinds() {
        let all = store::list_all(store, stream.query(kind)).await?;
        out.extend(all.into_iter().filter(|r| stream.belongs(kind, &r.labels)));
    }
    Ok((revision, out))
}

/// Turn a received batch into resources to store: validated with the kind's typed spec,
/// renamed for this end, and stamped (global stamps the stream's zone, whatever the payload
/// claims). Any invalid item refuses the whole batch.
pub fn admit(stream: &Stream, batch: &Batch) -> Result<(Vec<Resource>, Vec<Key>), Invalid> {
    let kind = batch.kind;
    if !stream.kinds().contains(&kind) {
        return Err(Invalid::one(
            "kind",
            format!("{kind} does not flow on this stream"),
        ));
    }
    let mesh_of =
        |m: &str| -> Option<String> { (kind.scope() == Scope::Mesh).then(|| m.to_string()) };
    let mut upserts = Vec::with_capacity(batch.upserts.len());
    for item in &batch.upserts {
        let (mesh, name) = (&item.key.0, &item.key.1);
        // A name may carry a zone suffix (`ingress-1.west`): validate its parts.
        let (base, suffix) = match name.split_once('.') {
            Some((b, s)) => (b, Some(s)),
            None => (name.as_str(), None),
        };
        if let Some(s) = suffix {
            check_dns_label(s).map_err(|m| Invalid::one(format!("{kind} {name}: name"), m))?;
        }
        let mut labels = item.labels.clone();
        if stream.side == Side::Global && stream.dir == Direction::ZoneToGlobal {
            labels.insert(ORIGIN_LABEL.to_string(), "zone".to_string());
            labels.insert(ZONE_LABEL.to_string(), stream.zone.clone());
        }
        let mut r = Resource::new(
            kind,
            mesh_of(mesh).as_deref(),
            base,
            labels,
            item.spec.clone(),
        )
        .map_err(|e| e.prefixed(&format!("{kind} {name:?}")))?;
        r.name = stream.stored_name(name);
        upserts.push(r);
    }
    let deletes = batch
        .deletes
        .iter()
        .map(|(mesh, name)| Key {
            kind,
            mesh: mesh_of(mesh),
            name: stream.stored_name(name),
        })
        .collect();
    Ok((upserts, deletes))
}

/// Apply an admitted batch to the receiver's store: upserts in one transaction, then deletes
/// (a resource already gone is fine).
pub async fn apply(
    store: &dyn Store,
    upserts: Vec<Resource>,
    deletes: Vec<Key>,
) -> store::Result<()> {
    if !upserts.is_empty() {
        store.apply(upserts, false).await?;
    }
    for key in deletes {
        match store.delete(&key, None).await {
            Ok(()) | Err(store::Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reconnect delay: exponential from `base` up to `max`, with full jitter (`unit` is a
/// random number in [0, 1)), so a global restart does not bring every zone back at once.
pub fn backoff(attempt: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.min(20)));
    let cap = exp.min(max);
    let jittered = cap.mul_f64(unit.clamp(0.0, 1.0));
    jittered.max(base / 2)
}

#[cfg(test)]
mod tests;
