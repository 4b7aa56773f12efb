//! The I/O loops of a KDS stream, shared by global (server) and zone (client): a sender loop
//! driving `weft_core::kds::Sender` from the store's change feed, and a receiver loop that
//! announces its inventory and applies batches. Each loop checks its stream's liveness:
//! it pings every `interval` and gives up when nothing arrived for `timeout`, so a silently
//! stalled stream is torn down (and the zone reconnects) instead of hanging forever.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weft_core::Kind;
use weft_core::kds::{self, Ack, Action, Hello, KindStats, Msg, Sender};
use weft_core::store::{self, Store};

use crate::convert::{self, BadMessage};
use crate::kds::v1 as pb;

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stream closed by the peer")]
    Closed,
    #[error("stream stalled: nothing received for {0:?}")]
    Stalled(Duration),
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("store: {0}")]
    Store(#[from] store::Error),
    #[error(transparent)]
    Protocol(#[from] BadMessage),
}

/// Ping cadence and the deadline after which a silent stream is considered stalled.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Liveness {
    /// Settings from configuration (`None`: the default), checked: a stall deadline must be
    /// longer than the ping interval, or every stream would be declared stalled.
    pub fn resolve(
        interval: Option<Duration>,
        timeout: Option<Duration>,
    ) -> Result<Liveness, String> {
        let d = Liveness::default();
        let live = Liveness {
            interval: interval.unwrap_or(d.interval),
            timeout: timeout.unwrap_or(d.timeout),
        };
        if live.interval.is_zero() || live.timeout <= live.interval {
            return Err(
                "--kds-stall-timeout must be longer than --kds-ping-interval (and both above 0)"
                    .into(),
            );
        }
        Ok(live)
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(20),
        }
    }
}

/// Counters of one stream, shared with whoever reports them (metrics, zone insight).
#[derive(Default)]
pub struct Stats {
    inner: Mutex<Snapshot>,
}

/// A copy of a stream's counters.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Per kind: resources sent (sender) or received (receiver), acknowledged / applied,
    /// NACKed / refused.
    pub kinds: BTreeMap<Kind, KindStats>,
    /// The reconciliation after the last (re)connect completed.
    pub synced: bool,
    pub last_nack: Option<String>,
    pub peer: Option<Hello>,
    pub connected_at: Option<Instant>,
    pub last_seen: Option<Instant>,
    /// Receiving end: how long the newest change of the last applied batch took from its
    /// write at the sender to being applied here (wall clocks of both ends).
    pub last_lag: Option<Duration>,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.lock())
    }
}

/// A sink for outgoing messages: the channel feeding the gRPC stream.
pub type Out = mpsc::Sender<pb::Message>;

/// Send, but give up when the peer has not taken anything for the stall deadline: a send
/// that blocks on a full stream is a stall too.
async fn send(out: &Out, m: Msg, live: Liveness) -> Result<(), Error> {
    match tokio::time::timeout(live.timeout, out.send(convert::to_wire(m))).await {
        Ok(r) => r.map_err(|_| Error::Closed),
        Err(_) => Err(Error::Stalled(live.timeout)),
    }
}

fn hello(stream: &kds::Stream, instance: &str) -> Msg {
    Msg::Hello(Hello {
        zone: stream.zone.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        instance: instance.to_string(),
    })
}

/// Common per-message bookkeeping; returns the message for the loop to handle.
fn received(stats: &Stats, m: Result<pb::Message, tonic::Status>) -> Result<Msg, Error> {
    let m = convert::from_wire(m?)?;
    stats.update(|s| {
        s.last_seen = Some(Instant::now());
        if let Msg::Hello(h) = &m {
            s.peer = Some(h.clone());
        }
    });
    Ok(m)
}

/// Run the sending end until the stream ends or `cancel` fires.
pub async fn run_sender<S>(
    store: Arc<dyn Store>,
    stream: kds::Stream,
    instance: &str,
    mut incoming: S,
    out: Out,
    live: Liveness,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) -> Result<(), Error>
where
    S: Stream<Item = Result<pb::Message, tonic::Status>> + Unpin,
{
    let mut sender = Sender::new(stream.clone(), kds::MAX_BATCH_BYTES);
    let mut watch = store.watch();
    let mut following = false;
    let mut read_feed = false;
    let mut ping = tokio::time::interval(live.interval);
    let mut last_rx = Instant::now();
    let mut ping_id = 0u64;
    stats.update(|s| {
        s.connected_at = Some(Instant::now());
        s.synced = false;
    });
    send(&out, hello(&stream, instance), live).await?;
    loop {
        let mut actions = Vec::new();
        if read_feed {
            read_feed = false;
            actions.extend(follow(&*store, &mut sender).await?);
        } else {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                m = incoming.next() => {
                    let m = m.ok_or(Error::Closed)?;
                    last_rx = Instant::now();
                    match received(&stats, m)? {
                        Msg::Inventory(inv) => actions = sender.on_inventory(inv),
                        Msg::Ack(ack) => actions = sender.on_ack(ack),
                        Msg::Ping(id) => send(&out, Msg::Pong(id), live).await?,
                        Msg::Pong(_) | Msg::Hello(_) => {}
                        Msg::Batch(_) => return Err(BadMessage("a batch sent to the sending end".into()).into()),
                    }
                }
                changed = watch.changed(), if following => {
                    if changed.is_err() {
                        return Err(Error::Closed);
                    }
                    read_feed = true;
                }
                _ = ping.tick() => {
                    if last_rx.elapsed() > live.timeout {
                        return Err(Error::Stalled(last_rx.elapsed()));
                    }
                    ping_id += 1;
                    send(&out, Msg::Ping(ping_id), live).await?;
                }
            }
        }
        while !actions.is_empty() {
            for action in std::mem::take(&mut actions) {
                match action {
                    Action::Send(m) => send(&out, m, live).await?,
                    Action::Snapshot => {
                        let (revision, resources) = kds::snapshot(&*store, &stream).await?;
                        actions.extend(sender.on_snapshot(revision, resources));
                    }
                    Action::Follow(_) => {
                        following = true;
                        // Changes made while the snapshot was taken are in the feed already.
                        read_feed = true;
                        stats.update(|s| s.synced = true);
                    }
                    Action::Nacked { kind, reason } => {
                        tracing::warn!(zone = %stream.zone, %kind, %reason, "batch refused by the receiver");
                        stats.update(|s| s.last_nack = Some(format!("{kind}: {reason}")));
                    }
                }
            }
        }
        let copy = sender.stats().clone();
        stats.update(|s| s.kinds = copy);
    }
}

/// Read the change feed after the sender's cursor until it is drained.
async fn follow(store: &dyn Store, sender: &mut Sender) -> Result<Vec<Action>, Error> {
    let mut actions = Vec::new();
    loop {
        match store.events_since(sender.cursor(), 5_000).await {
            Ok(events) if events.is_empty() => return Ok(actions),
            Ok(events) => actions.extend(sender.on_events(events)),
            Err(store::Error::Compacted { since, oldest }) => {
                tracing::info!(
                    since,
                    oldest,
                    "change feed compacted; reconciling from a snapshot"
                );
                actions.extend(sender.resync());
                return Ok(actions);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Run the receiving end until the stream ends or `cancel` fires.
pub async fn run_receiver<S>(
    store: Arc<dyn Store>,
    stream: kds::Stream,
    instance: &str,
    mut incoming: S,
    out: Out,
    live: Liveness,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) -> Result<(), Error>
where
    S: Stream<Item = Result<pb::Message, tonic::Status>> + Unpin,
{
    let mut ping = tokio::time::interval(live.interval);
    let mut last_rx = Instant::now();
    let mut ping_id = 0u64;
    stats.update(|s| {
        s.connected_at = Some(Instant::now());
        s.synced = false;
    });
    send(&out, hello(&stream, instance), live).await?;
    for m in kds::inventory(&*store, &stream).await? {
        send(&out, m, live).await?;
    }
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = incoming.next() => {
                let m = m.ok_or(Error::Closed)?;
                last_rx = Instant::now();
                let batch = match m {
                    Ok(pb::Message { body: Some(pb::message::Body::Batch(b)) }) => {
                        let nonce = b.nonce;
                        let kind = b.kind.clone();
                        match convert::batch_from_wire(b) {
                            Ok(b) => b,
                            Err(e) => {
                                send(&out, Msg::Ack(Ack { nonce, nack: Some(e.to_string()) }), live).await?;
                                tracing::warn!(zone = %stream.zone, %kind, error = %e, "refused a batch");
                                continue;
                            }
                        }
                    }
                    other => {
                        match received(&stats, other)? {
                            Msg::Ping(id) => send(&out, Msg::Pong(id), live).await?,
                            Msg::Pong(_) | Msg::Hello(_) => {}
                            m => return Err(BadMessage(format!("unexpected message at the receiving end: {m:?}")).into()),
                        }
                        continue;
                    }
                };
                stats.update(|s| s.last_seen = Some(Instant::now()));
                let count = (batch.upserts.len() + batch.deletes.len()) as u64;
                let nack = match kds::admit(&stream, &batch) {
                    Ok((upserts, deletes)) => {
                        // A store failure is transient: end the stream and reconcile on
                        // reconnect rather than refusing the batch for good.
                        kds::apply(&*store, upserts, deletes).await?;
                        None
                    }
                    Err(invalid) => Some(invalid.to_string()),
                };
                let newest = batch.upserts.iter().map(|i| i.modified_ms).max().unwrap_or(0);
                let lag = (newest > 0 && nack.is_none()).then(|| {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    Duration::from_millis(now_ms.saturating_sub(newest).max(0) as u64)
                });
                stats.update(|s| {
                    if lag.is_some() {
                        s.last_lag = lag;
                    }
                    let k = s.kinds.entry(batch.kind).or_default();
                    k.sent += count;
                    match &nack {
                        None => k.acked += count,
                        Some(reason) => {
                            k.nacked += count;
                            k.last_nack = Some(reason.clone());
                            s.last_nack = Some(format!("{}: {reason}", batch.kind));
                        }
                    }
                    if batch.synced {
                        s.synced = true;
                    }
                });
                if let Some(reason) = &nack {
                    tracing::warn!(zone = %stream.zone, kind = %batch.kind, %reason, "refused a batch");
                }
                send(&out, Msg::Ack(Ack { nonce: batch.nonce, nack }), live).await?;
            }
            _ = ping.tick() => {
                if last_rx.elapsed() > live.timeout {
                    return Err(Error::Stalled(last_rx.elapsed()));
                }
                ping_id += 1;
                send(&out, Msg::Ping(ping_id), live).await?;
            }
        }
    }
}
