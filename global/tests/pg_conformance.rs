//! The store conformance suite on PostgreSQL (each case on a fresh database), plus what only
//! the PostgreSQL store does: change-feed pruning, bulk apply of thousands of resources, and
//! label selectors over prefixed keys and empty values.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use weft_core::store::conformance::{mk_mesh, mk_timeout};
use weft_core::store::{Error, ListQuery, Op, Store as _};
use weft_core::{Key, Kind, Resource};
use weft_global::pg::{self, testing::TestDb, testing::TestStore};

weft_core::store_conformance_tests!(async {
    Box::new(TestStore::create().await.expect("test database"))
});

async fn store() -> TestStore {
    TestStore::create().await.expect("test database")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_feed_reports_compacted() {
    let s = store().await;
    s.create(mk_mesh("m")).await.unwrap();
    for i in 0..10 {
        s.create(mk_timeout("m", &format!("t{i}"), &[], "1s"))
            .await
            .unwrap();
    }
    assert_eq!(s.revision().await.unwrap(), 11);
    assert_eq!(s.prune_events(5).await.unwrap(), 5);
    // Resuming from a pruned point must say so, never skip events silently.
    match s.events_since(2, 100).await {
        Err(Error::Compacted {
            since: 2,
            oldest: 6,
        }) => {}
        other => panic!("expected Compacted, got {other:?}"),
    }
    // Right at the boundary and after it, the feed is whole.
    let events = s.events_since(5, 100).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.revision).collect::<Vec<_>>(),
        (6..=11).collect::<Vec<_>>()
    );
    assert!(s.events_since(11, 100).await.unwrap().is_empty());
    // Everything pruned: a consumer behind the current revision must list again.
    s.prune_events(11).await.unwrap();
    assert!(matches!(
        s.events_since(10, 100).await,
        Err(Error::Compacted {
            since: 10,
            oldest: 12
        })
    ));
    assert!(
        s.events_since(11, 100).await.unwrap().is_empty(),
        "an up-to-date consumer is fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_in_the_background() {
    let db = TestDb::create().await.expect("test database");
    let options = pg::Options {
        feed_retention: Some(20),
        prune_every: 10,
        ..pg::Options::default()
    };
    let s = pg::Store::with_options(db.pool().await.unwrap(), CancellationToken::new(), options)
        .await
        .unwrap();
    s.create(mk_mesh("m")).await.unwrap();
    for i in 0..59 {
        s.create(mk_timeout("m", &format!("t{i}"), &[], "1s"))
            .await
            .unwrap();
    }
    // The listener task prunes when it sees the revision 10 past its last prune: by the time
    // it has seen revision 60, its last prune was at some r in 51..=60, through r - 20.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.events_since(0, 100).await {
            Err(Error::Compacted { since: 0, oldest }) if (32..=41).contains(&oldest) => break,
            Err(Error::Compacted { since: 0, oldest }) if oldest < 32 => {}
            Ok(_) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the feed was not pruned through revision 31 within 10s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.events_since(40, 100).await.unwrap().len(),
        20,
        "the last 20 are kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_delete_records_one_event_per_resource() {
    let s = store().await;
    s.create(mk_mesh("m")).await.unwrap();
    s.create(mk_mesh("other")).await.unwrap();
    for i in 0..3 {
        s.create(mk_timeout("m", &format!("t{i}"), &[], "1s"))
            .await
            .unwrap();
    }
    s.create(mk_timeout("other", "keep", &[], "1s"))
        .await
        .unwrap();
    let before = s.revision().await.unwrap();
    assert!(matches!(
        s.delete(&Key::new(Kind::Mesh, None, "m"), Some(2)).await,
        Err(Error::Conflict { current: 1, .. })
    ));
    assert_eq!(
        s.revision().await.unwrap(),
        before,
        "a failed delete writes nothing"
    );
    s.delete(&Key::new(Kind::Mesh, None, "m"), Some(1))
        .await
        .unwrap();
    let events = s.events_since(before, 100).await.unwrap();
    let summary: Vec<(Op, Kind, String)> = events
        .iter()
        .map(|e| (e.op, e.key.kind, e.key.name.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (Op::Delete, Kind::MeshTimeout, "t0".to_string()),
            (Op::Delete, Kind::MeshTimeout, "t1".to_string()),
            (Op::Delete, Kind::MeshTimeout, "t2".to_string()),
            (Op::Delete, Kind::Mesh, "m".to_string()),
        ]
    );
    assert_eq!(
        s.list(&ListQuery::all(Kind::MeshTimeout))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_with_prefixed_keys_empty_values_and_repeats() {
    let s = store().await;
    s.create(mk_mesh("m")).await.unwrap();
    s.create(mk_timeout(
        "m",
        "a",
        &[("weft.io/zone", "east"), ("k", "")],
        "1s",
    ))
    .await
    .unwrap();
    s.create(mk_timeout("m", "b", &[("weft.io/zone", "west")], "1s"))
        .await
        .unwrap();
    let names = |sel: &str| {
        let q = ListQuery {
            selector: sel.parse().unwrap(),
            ..ListQuery::all(Kind::MeshTimeout)
        };
        let s = &s;
        async move {
            s.list(&q)
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|r| r.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names("weft.io/zone=east").await, ["a"]);
    assert_eq!(names("k").await, ["a"], "an empty value still exists");
    assert_eq!(names("k=").await, ["a"]);
    assert_eq!(names("weft.io/zone!=east").await, ["b"]);
    // Two different values for one key can never both match.
    assert!(
        names("weft.io/zone=east,weft.io/zone=west")
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_batch_naming_a_resource_twice() {
    let s = store().await;
    s.create(mk_mesh("m")).await.unwrap();
    let before = s.revision().await.unwrap();
    let out = s
        .apply(
            vec![
                mk_timeout("m", "a", &[], "1s"),
                mk_timeout("m", "b", &[], "1s"),
                mk_timeout("m", "a", &[("x", "y")], "2s"),
            ],
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        out.iter().map(|o| o.action()).collect::<Vec<_>>(),
        ["created", "created", "updated"]
    );
    let a = s
        .get(&Key::new(Kind::MeshTimeout, Some("m"), "a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (a.meta.version, &a.spec, a.labels.len()),
        (2, &mk_timeout("m", "a", &[], "2s").spec, 1)
    );
    assert_eq!(a.meta.creation_time, out[0].resource().meta.creation_time);
    let events = s.events_since(before, 10).await.unwrap();
    let summary: Vec<(Op, String, u64)> = events
        .iter()
        .map(|e| (e.op, e.key.name.clone(), e.version))
        .collect();
    assert_eq!(
        summary,
        [
            (Op::Create, "a".into(), 1),
            (Op::Create, "b".into(), 1),
            (Op::Update, "a".into(), 2)
        ]
    );
    // Each event carries the resource as it was after that change.
    assert_eq!(
        events[0].resource.as_ref().unwrap().spec,
        mk_timeout("m", "a", &[], "1s").spec
    );
    assert_eq!(events[2].resource.as_deref(), Some(&a));
    assert_eq!(
        events[1].resource.as_ref().unwrap().mesh.as_deref(),
        Some("m")
    );
}

/// 10,000 policies applied in batches of 500 (what `weftctl apply` sends), then listed:
/// correctness, plus the timings printed for the record (`--nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_apply_and_list_ten_thousand() {
    let s = store().await;
    s.create(mk_mesh("bulk")).await.unwrap();
    let start_rev = s.revision().await.unwrap();
    const N: usize = 10_000;
    let all: Vec<Resource> = (0..N)
        .map(|i| {
            mk_timeout(
                "bulk",
                &format!("p{i:05}"),
                &[("team", &format!("t{}", i % 10))],
                "1s",
            )
        })
        .collect();
    let started = Instant::now();
    let mut batch_times = Vec::new();
    for chunk in all.chunks(500) {
        let t = Instant::now();
        let out = s.apply(chunk.to_vec(), false).await.unwrap();
        batch_times.push(t.elapsed());
        assert!(out.iter().all(|o| o.action() == "created"));
    }
    let apply_total = started.elapsed();
    assert_eq!(s.revision().await.unwrap(), start_rev + N as u64);

    // Re-applying unchanged content writes nothing; changing every spec updates all.
    let t = Instant::now();
    let out = s.apply(all[..500].to_vec(), false).await.unwrap();
    let unchanged_time = t.elapsed();
    assert!(out.iter().all(|o| o.action() == "unchanged"));
    assert_eq!(s.revision().await.unwrap(), start_rev + N as u64);
    let changed: Vec<Resource> = (0..500)
        .map(|i| mk_timeout("bulk", &format!("p{i:05}"), &[], "2s"))
        .collect();
    let t = Instant::now();
    let out = s.apply(changed, false).await.unwrap();
    let update_time = t.elapsed();
    assert!(
        out.iter()
            .all(|o| o.action() == "updated" && o.resource().meta.version == 2)
    );

    let t = Instant::now();
    let listed = s
        .list(&ListQuery::in_mesh(Kind::MeshTimeout, "bulk"))
        .await
        .unwrap();
    let list_time = t.elapsed();
    assert_eq!(listed.items.len(), N);
    assert!(listed.items.windows(2).all(|w| w[0].name < w[1].name));
    let t = Instant::now();
    let q = ListQuery {
        selector: "team=t3".parse().unwrap(),
        ..ListQuery::in_mesh(Kind::MeshTimeout, "bulk")
    };
    assert_eq!(
        s.list(&q).await.unwrap().items.len(),
        N / 10 - 50,
        "the first 500 lost their labels"
    );
    let select_time = t.elapsed();

    batch_times.sort();
    let median = batch_times[batch_times.len() / 2];
    let max = batch_times[batch_times.len() - 1];
    eprintln!(
        "pg bulk: 10,000 created in 20 batches of 500: total {apply_total:?}, batch median {median:?}, max {max:?}; \
         500 unchanged {unchanged_time:?}; 500 updated {update_time:?}; list 10,000 {list_time:?}; \
         selector over 10,000 {select_time:?}"
    );
    // A generous bound that only a pathological regression (row-at-a-time writes) breaks.
    assert!(
        apply_total < Duration::from_secs(30),
        "10,000 resources took {apply_total:?}"
    );
}
