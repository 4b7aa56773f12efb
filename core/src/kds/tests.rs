//! The sender state machine driven over a simulated network: connections drop, messages are
//! delayed, the source changes all the while; once the network heals, the receiver must hold
//! exactly what the sender has.

use std::collections::{BTreeMap, VecDeque};

use serde_json::json;

use super::*;
use crate::store::Memory;

/// A small deterministic random source (no dependencies).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn timeout(mesh: &str, name: &str, secs: u64) -> Resource {
    Resource::new(
        Kind::MeshTimeout,
        Some(mesh),
        name,
        BTreeMap::new(),
        json!({"to": [{"targetRef": {"kind": "Mesh"}, "default": {"connectionTimeout": format!("{secs}s")}}]}),
    )
    .unwrap()
}

fn mesh(name: &str) -> Resource {
    Resource::new(Kind::Mesh, None, name, BTreeMap::new(), json!({})).unwrap()
}

fn dataplane(zone: &str, name: &str, port: u16) -> Resource {
    let labels = BTreeMap::from([
        (ZONE_LABEL.to_string(), zone.to_string()),
        (ORIGIN_LABEL.to_string(), "zone".to_string()),
    ]);
    Resource::new(
        Kind::Dataplane,
        Some("default"),
        name,
        labels,
        json!({"networking": {"address": "10.0.0.1", "inbound": [{"port": port, "tags": {"weft.io/service": "web"}}]}}),
    )
    .unwrap()
}

/// What an end holds for a stream: (kind, mesh, wire name) -> content hash.
async fn holdings(store: &dyn Store, stream: &Stream) -> BTreeMap<(Kind, WireKey), Hash> {
    let (_, resources) = snapshot(store, stream).await.unwrap();
    resources
        .iter()
        .map(|r| {
            (
                (
                    r.kind,
                    (
                        r.mesh.clone().unwrap_or_default(),
                        stream.wire_name(&r.name).to_string(),
                    ),
                ),
                hash_of(r),
            )
        })
        .collect()
}

/// One simulated connection between the sender and the receiver.
struct Conn {
    sender: Sender,
    to_sender: VecDeque<Msg>,
    to_receiver: VecDeque<Msg>,
    following: bool,
}

struct Sim {
    source: Memory,
    dest: Memory,
    send_stream: Stream,
    recv_stream: Stream,
    conn: Option<Conn>,
    rng: Rng,
    connects: u32,
    nacks: u32,
    reordered: u32,
}

impl Sim {
    async fn connect(&mut self) {
        let mut conn = Conn {
            sender: Sender::new(self.send_stream.clone(), 2_000),
            to_sender: VecDeque::new(),
            to_receiver: VecDeque::new(),
            following: false,
        };
        conn.to_sender
            .extend(inventory(&self.dest, &self.recv_stream).await.unwrap());
        self.conn = Some(conn);
        self.connects += 1;
    }

    /// Deliver one message in one direction (in order within the connection, like a stream).
    async fn step(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let to_receiver = self.rng.chance(50);
        if to_receiver {
            if let Some(msg) = conn.to_receiver.pop_front() {
                let Msg::Batch(batch) = msg else {
                    panic!("receiver got {msg:?}")
                };
                let reply = match admit(&self.recv_stream, &batch) {
                    Ok((ups, dels)) => apply(&self.dest, ups, dels)
                        .await
                        .map_err(|e| e.to_string())
                        .err(),
                    Err(e) => Some(e.to_string()),
                };
                conn.to_sender.push_back(Msg::Ack(Ack {
                    nonce: batch.nonce,
                    nack: reply,
                }));
            }
            return;
        }
        // Acks are independent of each other: deliver them out of order now and then.
        if conn.to_sender.len() > 1
            && matches!(conn.to_sender[0], Msg::Ack(_))
            && matches!(conn.to_sender[1], Msg::Ack(_))
            && self.rng.chance(30)
        {
            conn.to_sender.swap(0, 1);
            self.reordered += 1;
        }
        let Some(msg) = conn.to_sender.pop_front() else {
            return;
        };
        let actions = match msg {
            Msg::Inventory(inv) => conn.sender.on_inventory(inv),
            Msg::Ack(ack) => conn.sender.on_ack(ack),
            other => panic!("sender got {other:?}"),
        };
        self.run(actions).await;
    }

    async fn run(&mut self, mut actions: Vec<Action>) {
        while let Some(a) = (!actions.is_empty()).then(|| actions.remove(0)) {
            let conn = self.conn.as_mut().unwrap();
            match a {
                Action::Send(m) => conn.to_receiver.push_back(m),
                Action::Snapshot => {
                    let (rev, rs) = snapshot(&self.source, &self.send_stream).await.unwrap();
                    actions.extend(conn.sender.on_snapshot(rev, rs));
                }
                Action::Follow(_) => conn.following = true,
                Action::Nacked { .. } => self.nacks += 1,
            }
        }
    }

    /// The I/O loop's reaction to a store change: read the feed after the cursor.
    async fn feed(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if !conn.following {
            return;
        }
        let events = self
            .source
            .events_since(conn.sender.cursor(), 50)
            .await
            .unwrap();
        let actions = conn.sender.on_events(events);
        self.run(actions).await;
    }

    fn quiet(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.following && c.to_sender.is_empty() && c.to_receiver.is_empty())
    }
}

async fn mutate_global(source: &Memory, rng: &mut Rng) {
    let meshes = ["default", "m1", "m2"];
    let m = meshes[rng.below(3) as usize];
    let name = format!("t{}", rng.below(25));
    match rng.below(10) {
        0 => {
            let _ = source.create(mesh(m)).await;
        }
        1 => {
            let _ = source
                .delete(&Key::new(Kind::MeshTimeout, Some(m), &name), None)
                .await;
        }
        2 if m != "default" => {
            // Cascades: every timeout in it goes too.
            let _ = source.delete(&Key::new(Kind::Mesh, None, m), None).await;
        }
        _ => {
            if source
                .get(&Key::new(Kind::Mesh, None, m))
                .await
                .unwrap()
                .is_some()
            {
                source
                    .apply(vec![timeout(m, &name, 1 + rng.below(9))], false)
                    .await
                    .unwrap();
            }
        }
    }
}

async fn simulate(seed: u64, send: Stream, recv: Stream, mutate: bool) -> Sim {
    let mut sim = Sim {
        source: Memory::with_feed_capacity(10_000),
        dest: Memory::new(),
        send_stream: send,
        recv_stream: recv,
        conn: None,
        rng: Rng(seed | 1),
        connects: 0,
        nacks: 0,
        reordered: 0,
    };
    sim.source.create(mesh("default")).await.unwrap();
    sim.connect().await;
    for _ in 0..3_000 {
        match sim.rng.below(100) {
            0..=1 => {
                // The connection drops: everything in flight is lost; reconnect.
                sim.conn = None;
                sim.connect().await;
            }
            2..=21 if mutate => {
                mutate_global(&sim.source, &mut sim.rng).await;
                sim.feed().await;
            }
            22..=26 => {
                // Delay: a change is seen late (the watch fired but the loop was busy).
                if mutate {
                    mutate_global(&sim.source, &mut sim.rng).await;
                }
            }
            _ => sim.step().await,
        }
    }
    // Heal: no more drops or changes; run until nothing is left in flight.
    for _ in 0..100_000 {
        sim.feed().await;
        sim.step().await;
        if sim.quiet()
            && sim
                .source
                .events_since(sim.conn.as_ref().unwrap().sender.cursor(), 1)
                .await
                .unwrap()
                .is_empty()
        {
            break;
        }
    }
    assert!(sim.quiet(), "seed {seed}: did not settle");
    sim
}

#[tokio::test]
async fn converges_after_drops_and_delays_global_to_zone() {
    for seed in [1, 7, 42, 1234, 99_991] {
        let send = Stream::new(Direction::GlobalToZone, "east", Side::Global);
        let recv = Stream::new(Direction::GlobalToZone, "east", Side::Zone);
        let sim = simulate(seed, send.clone(), recv.clone(), true).await;
        let want = holdings(&sim.source, &send).await;
        let got = holdings(&sim.dest, &recv).await;
        assert_eq!(got, want, "seed {seed}: receiver differs from sender");
        assert!(want.len() > 3, "seed {seed}: the simulation made changes");
        assert!(sim.connects > 5, "seed {seed}: connections dropped");
        assert!(sim.reordered > 0, "seed {seed}: acks were reordered");
        assert_eq!(sim.nacks, 0);
    }
}

#[tokio::test]
async fn reconnect_reconciles_deletes_made_while_away() {
    let send = Stream::new(Direction::GlobalToZone, "east", Side::Global);
    let recv = Stream::new(Direction::GlobalToZone, "east", Side::Zone);
    let mut sim = simulate(5, send.clone(), recv.clone(), false).await;
    for i in 0..10 {
        sim.source
            .apply(vec![timeout("default", &format!("x{i}"), 2)], false)
            .await
            .unwrap();
    }
    sim.feed().await;
    while !sim.quiet() {
        sim.step().await;
    }
    assert_eq!(holdings(&sim.dest, &recv).await.len(), 11);
    // Away: deletes and an update happen with no connection.
    sim.conn = None;
    for i in 0..5 {
        sim.source
            .delete(
                &Key::new(Kind::MeshTimeout, Some("default"), &format!("x{i}")),
                None,
            )
            .await
            .unwrap();
    }
    sim.source
        .apply(vec![timeout("default", "x9", 7)], false)
        .await
        .unwrap();
    sim.connect().await;
    for _ in 0..10_000 {
        if sim.quiet() {
            break;
        }
        sim.step().await;
    }
    assert_eq!(
        holdings(&sim.dest, &recv).await,
        holdings(&sim.source, &send).await
    );
    assert_eq!(holdings(&sim.dest, &recv).await.len(), 6);
}

#[tokio::test]
async fn zone_to_global_names_and_stamps() {
    let zone = Memory::new();
    let global = Memory::new();
    global.create(mesh("default")).await.unwrap();
    zone.create(mesh("default")).await.unwrap();
    let mut dp = dataplane("east", "web-1", 8080);
    dp.labels.insert("team".into(), "a".into());
    zone.create(dp).await.unwrap();
    // Another zone's dataplane in global, with the same name: it must not be touched.
    let mut west = dataplane("west", "web-1", 9090);
    west.name = "web-1.west".into();
    global.create(west).await.unwrap();
    let send = Stream::new(Direction::ZoneToGlobal, "east", Side::Zone);
    let recv = Stream::new(Direction::ZoneToGlobal, "east", Side::Global);
    let mut sender = Sender::new(send.clone(), MAX_BATCH_BYTES);
    let mut actions = Vec::new();
    for m in inventory(&global, &recv).await.unwrap() {
        let Msg::Inventory(inv) = m else {
            unreachable!()
        };
        assert!(inv.entries.is_empty(), "global holds nothing of east yet");
        actions.extend(sender.on_inventory(inv));
    }
    assert_eq!(actions, vec![Action::Snapshot]);
    let (rev, rs) = snapshot(&zone, &send).await.unwrap();
    for a in sender.on_snapshot(rev, rs) {
        if let Action::Send(Msg::Batch(mut b)) = a {
            // A zone lying about itself is corrected to the stream's zone.
            for i in &mut b.upserts {
                i.labels.insert(ZONE_LABEL.into(), "west".into());
            }
            let (ups, dels) = admit(&recv, &b).unwrap();
            apply(&global, ups, dels).await.unwrap();
        }
    }
    let stored = global
        .get(&Key::new(Kind::Dataplane, Some("default"), "web-1.east"))
        .await
        .unwrap()
        .expect("stored as name.zone");
    assert_eq!(stored.labels[ZONE_LABEL], "east");
    assert_eq!(stored.labels[ORIGIN_LABEL], "zone");
    assert_eq!(stored.labels["team"], "a");
    let west = global
        .get(&Key::new(Kind::Dataplane, Some("default"), "web-1.west"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(west.labels[ZONE_LABEL], "west");
    // Global's inventory for east maps names back and leaves west out.
    let inv = inventory(&global, &recv).await.unwrap();
    let entries: Vec<&Entry> = inv
        .iter()
        .flat_map(|m| match m {
            Msg::Inventory(i) => i.entries.iter().collect::<Vec<_>>(),
            _ => vec![],
        })
        .collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].key, ("default".to_string(), "web-1".to_string()));
}

#[test]
fn large_kinds_are_chunked() {
    let send = Stream::new(Direction::GlobalToZone, "east", Side::Global);
    let mut s = Sender::new(send, 10_000);
    let mut actions = Vec::new();
    for k in kinds(Direction::GlobalToZone) {
        actions.extend(s.on_inventory(Inventory {
            kind: k,
            entries: vec![],
            last: true,
        }));
    }
    assert_eq!(actions, vec![Action::Snapshot]);
    let rs: Vec<Resource> = (0..1_000)
        .map(|i| timeout("default", &format!("t{i}"), 1))
        .collect();
    let out = s.on_snapshot(10, rs);
    let batches: Vec<&Batch> = out
        .iter()
        .filter_map(|a| match a {
            Action::Send(Msg::Batch(b)) => Some(b),
            _ => None,
        })
        .collect();
    assert!(
        batches.len() > 5,
        "split into several batches: {}",
        batches.len()
    );
    assert_eq!(
        batches.iter().map(|b| b.upserts.len()).sum::<usize>(),
        1_000
    );
    assert!(
        batches
            .iter()
            .all(|b| b.upserts.iter().map(estimate).sum::<usize>() <= 10_000)
    );
    assert_eq!(batches.iter().filter(|b| b.synced).count(), 1);
    assert!(batches.last().unwrap().synced);
    assert_eq!(out.last(), Some(&Action::Follow(10)));
}

#[test]
fn nack_is_counted_and_other_kinds_go_on() {
    let send = Stream::new(Direction::GlobalToZone, "east", Side::Global);
    let mut s = Sender::new(send, MAX_BATCH_BYTES);
    for k in kinds(Direction::GlobalToZone) {
        s.on_inventory(Inventory {
            kind: k,
            entries: vec![],
            last: true,
        });
    }
    let out = s.on_snapshot(3, vec![mesh("default"), timeout("default", "a", 1)]);
    let nonces: Vec<(Kind, u64)> = out
        .iter()
        .filter_map(|a| match a {
            Action::Send(Msg::Batch(b)) => Some((b.kind, b.nonce)),
            _ => None,
        })
        .collect();
    assert_eq!(nonces.len(), 2);
    let nacked = s.on_ack(Ack {
        nonce: nonces[1].1,
        nack: Some("bad".into()),
    });
    assert_eq!(
        nacked,
        vec![Action::Nacked {
            kind: Kind::MeshTimeout,
            reason: "bad".into()
        }]
    );
    assert!(
        s.on_ack(Ack {
            nonce: nonces[0].1,
            nack: None
        })
        .is_empty()
    );
    assert_eq!(s.stats()[&Kind::Mesh].acked, 1);
    assert_eq!(s.stats()[&Kind::MeshTimeout].nacked, 1);
    assert_eq!(
        s.stats()[&Kind::MeshTimeout].last_nack.as_deref(),
        Some("bad")
    );
    // The NACKed resource is sent again with the next change event for it.
    let ev = Event {
        revision: 4,
        op: Op::Update,
        key: Key::new(Kind::MeshTimeout, Some("default"), "a"),
        version: 1,
        resource: Some(Arc::new(timeout("default", "a", 1))),
    };
    let again = s.on_events(vec![ev]);
    assert_eq!(again.len(), 1);
}

#[test]
fn backoff_grows_caps_and_jitters() {
    let base = Duration::from_millis(100);
    let max = Duration::from_secs(30);
    assert!(backoff(0, base, max, 0.99) <= Duration::from_millis(100));
    assert!(backoff(5, base, max, 0.99) > Duration::from_secs(3));
    assert!(backoff(30, base, max, 0.999) <= max);
    assert!(backoff(30, base, max, 0.0) >= base / 2);
    assert_ne!(backoff(8, base, max, 0.1), backoff(8, base, max, 0.9));
}

#[test]
fn flow_table() {
    let g2z = kinds(Direction::GlobalToZone);
    let z2g = kinds(Direction::ZoneToGlobal);
    assert!(
        g2z.contains(&Kind::MeshTimeout)
            && g2z.contains(&Kind::Mesh)
            && g2z.contains(&Kind::ZoneIngress)
            && g2z.contains(&Kind::MeshService)
    );
    assert!(!g2z.contains(&Kind::Dataplane) && !g2z.contains(&Kind::ZoneEgress));
    assert_eq!(
        z2g,
        vec![
            Kind::Dataplane,
            Kind::ZoneIngress,
            Kind::ZoneEgress,
            Kind::MeshService
        ]
    );
}
