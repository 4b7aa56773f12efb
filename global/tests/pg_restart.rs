//! The PostgreSQL store across a database restart and an outage (on a throwaway server of
//! the test's own), and two stores on one database acting as two global replicas.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_core::store::conformance::{mk_mesh, mk_timeout};
use weft_core::store::{Error, Event, Store as _};
use weft_core::{Key, Kind};
use weft_global::pg::{self, testing::TempServer, testing::TestDb};

/// Wait until the watch reaches `target`, or fail after `within`.
async fn wait_for(rx: &mut watch::Receiver<u64>, target: u64, within: Duration, what: &str) {
    let reached = tokio::time::timeout(within, async {
        while *rx.borrow_and_update() < target {
            if rx.changed().await.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(
        reached,
        Ok(true),
        "{what}: watch never reached revision {target} (at {})",
        *rx.borrow()
    );
}

/// A change-feed consumer: remembers the last revision it saw and reads everything after it.
struct Consumer {
    last: u64,
    seen: Vec<Event>,
}

impl Consumer {
    async fn catch_up(&mut self, s: &pg::Store) {
        loop {
            let batch = s.events_since(self.last, 7).await.expect("events_since");
            let Some(last) = batch.last() else { return };
            assert_eq!(batch[0].revision, self.last + 1, "no gap");
            self.last = last.revision;
            self.seen.extend(batch);
        }
    }

    fn names(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|e| e.key.kind == Kind::MeshTimeout)
            .map(|e| e.key.name.clone())
            .collect()
    }
}

async fn store_on(url: &str, acquire_timeout: Duration) -> pg::Store {
    let pool = pg::pool_options()
        .acquire_timeout(acquire_timeout)
        .connect(url)
        .await
        .expect("connect");
    pg::migrate(&pool).await.expect("migrate");
    pg::Store::new(pool, CancellationToken::new())
        .await
        .expect("store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_restart_and_outage() {
    let server = TempServer::create().await.expect("throwaway PostgreSQL");
    let a = store_on(&server.url(), Duration::from_secs(1)).await;
    // A second replica on the same database: it only learns of A's writes through
    // LISTEN/NOTIFY (or its resync after reconnecting), never through A's watch.
    let b = store_on(&server.url(), Duration::from_secs(1)).await;
    let mut b_watch = b.watch();
    let mut consumer = Consumer {
        last: 0,
        seen: Vec::new(),
    };
    let mut written = Vec::new();

    a.create(mk_mesh("m")).await.unwrap();
    for i in 0..5 {
        let name = format!("before{i}");
        a.create(mk_timeout("m", &name, &[], "1s")).await.unwrap();
        written.push(name);
    }
    consumer.catch_up(&b).await;
    wait_for(
        &mut b_watch,
        6,
        Duration::from_secs(10),
        "replica before restart",
    )
    .await;

    // Restart: the very next operations on the same stores succeed.
    server.restart().await.unwrap();
    assert!(
        a.get(&Key::new(Kind::MeshTimeout, Some("m"), "before0"))
            .await
            .unwrap()
            .is_some()
    );
    a.ping().await.unwrap();
    for i in 0..5 {
        let name = format!("after{i}");
        a.create(mk_timeout("m", &name, &[], "1s")).await.unwrap();
        written.push(name);
    }
    a.update(mk_timeout("m", "before0", &[], "9s"), 1)
        .await
        .unwrap();
    let rev = a.revision().await.unwrap();
    assert_eq!(rev, 12);
    // B's listener reconnects by itself and its watch keeps working.
    wait_for(
        &mut b_watch,
        rev,
        Duration::from_secs(20),
        "replica after restart",
    )
    .await;
    consumer.catch_up(&b).await;
    assert_eq!(consumer.last, rev);

    // Outage: requests fail fast with Backend (retry later), not hang and not panic.
    server.stop().await.unwrap();
    let t = Instant::now();
    match a.get(&Key::new(Kind::Mesh, None, "m")).await {
        Err(Error::Backend(msg)) => assert!(msg.contains("postgres"), "{msg}"),
        other => panic!("expected Backend while the database is down, got {other:?}"),
    }
    assert!(matches!(
        a.create(mk_timeout("m", "lost", &[], "1s")).await,
        Err(Error::Backend(_))
    ));
    assert!(matches!(
        b.events_since(consumer.last, 10).await,
        Err(Error::Backend(_))
    ));
    assert!(matches!(a.ping().await, Err(Error::Backend(_))));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "four requests took {:?} while down",
        t.elapsed()
    );

    server.start().await.unwrap();
    for i in 0..3 {
        let name = format!("back{i}");
        a.create(mk_timeout("m", &name, &[], "1s")).await.unwrap();
        written.push(name);
    }
    a.delete(&Key::new(Kind::MeshTimeout, Some("m"), "after0"), None)
        .await
        .unwrap();
    let rev = a.revision().await.unwrap();
    assert_eq!(
        rev, 16,
        "the write that failed during the outage left no trace"
    );
    wait_for(
        &mut b_watch,
        rev,
        Duration::from_secs(20),
        "replica after outage",
    )
    .await;
    // The consumer resumes from the last revision it saw: every event once, in order.
    consumer.catch_up(&b).await;
    assert_eq!(
        consumer.seen.iter().map(|e| e.revision).collect::<Vec<_>>(),
        (1..=rev).collect::<Vec<_>>()
    );
    let mut want = written.clone();
    want.insert(10, "before0".to_string()); // the update
    want.push("after0".to_string()); // the delete
    assert_eq!(consumer.names(), want);
    // And writes through B wake A (A's listener reconnected too).
    let mut a_watch = a.watch();
    b.create(mk_timeout("m", "from-b", &[], "1s"))
        .await
        .unwrap();
    wait_for(
        &mut a_watch,
        rev + 1,
        Duration::from_secs(20),
        "A hears B after the outage",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_changes() {
    let db = TestDb::create().await.expect("test database");
    let a = store_on(db.url(), Duration::from_secs(3)).await;
    let b = store_on(db.url(), Duration::from_secs(3)).await;
    let mut a_watch = a.watch();
    let mut b_watch = b.watch();

    a.create(mk_mesh("m")).await.unwrap();
    wait_for(&mut b_watch, 1, Duration::from_secs(10), "B hears A").await;
    let events = b.events_since(0, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].key, Key::new(Kind::Mesh, None, "m"));

    b.apply(
        (0..50)
            .map(|i| mk_timeout("m", &format!("t{i}"), &[], "1s"))
            .collect(),
        false,
    )
    .await
    .unwrap();
    wait_for(
        &mut a_watch,
        51,
        Duration::from_secs(10),
        "A hears B's batch",
    )
    .await;
    assert_eq!(a.events_since(1, 100).await.unwrap().len(), 50);

    // Interleaved writers on both replicas: one contiguous feed, both watches at the end.
    tokio::join!(
        async {
            for i in 0..20 {
                a.create(mk_timeout("m", &format!("a{i}"), &[], "1s"))
                    .await
                    .unwrap();
            }
        },
        async {
            for i in 0..20 {
                b.create(mk_timeout("m", &format!("b{i}"), &[], "1s"))
                    .await
                    .unwrap();
            }
        }
    );
    let rev = a.revision().await.unwrap();
    assert_eq!(rev, 91);
    wait_for(&mut a_watch, rev, Duration::from_secs(10), "A at the end").await;
    wait_for(&mut b_watch, rev, Duration::from_secs(10), "B at the end").await;
    let feed = b.events_since(51, 1000).await.unwrap();
    assert_eq!(
        feed.iter().map(|e| e.revision).collect::<Vec<_>>(),
        (52..=rev).collect::<Vec<_>>()
    );
    assert_eq!(
        b.counts()
            .await
            .unwrap()
            .iter()
            .find(|c| c.kind == Kind::MeshTimeout)
            .unwrap()
            .count,
        90
    );
    drop((a, b));
    db.cleanup().await.unwrap();
}
