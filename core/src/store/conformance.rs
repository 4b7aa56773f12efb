//! The store conformance suite: one set of behaviours every `Store` backend must show.
//! Backends run it with [`store_conformance_tests!`](crate::store_conformance_tests), which
//! makes one `#[tokio::test]` per case, each on a fresh store.

use std::collections::BTreeMap;

use futures::future::join_all;
use serde_json::json;

use super::{Error, ListQuery, Op, Outcome, Store};
use crate::kind::Kind;
use crate::resource::{Key, Resource};

/// Generate one test per conformance case. `$mk` is an expression evaluated per test that
/// yields a future of something that derefs to a `Store` (a `Box`, an `Arc`, ...).
#[macro_export]
macro_rules! store_conformance_tests {
    ($mk:expr) => {
        $crate::store_conformance_tests!(@cases $mk;
            create_get, update_versions, delete_versions, mesh_delete_cascades, list_filters,
            pagination_over_thousands, apply_outcomes, concurrent_writers, change_feed,
            change_feed_resume, system_values, counts);
    };
    (@cases $mk:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let store = $mk.await;
                $crate::store::conformance::$case(&*store).await;
            }
        )*
    };
}

pub fn mk_mesh(name: &str) -> Resource {
    Resource::new(Kind::Mesh, None, name, BTreeMap::new(), json!({})).expect("valid mesh")
}

pub fn mk_timeout(mesh: &str, name: &str, labels: &[(&str, &str)], timeout: &str) -> Resource {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let spec = json!({
        "targetRef": {"kind": "Mesh"},
        "to": [{"targetRef": {"kind": "Mesh"}, "default": {"connectionTimeout": timeout}}]
    });
    Resource::new(Kind::MeshTimeout, Some(mesh), name, labels, spec).expect("valid timeout")
}

fn key(mesh: &str, name: &str) -> Key {
    Key::new(Kind::MeshTimeout, Some(mesh), name)
}

async fn seed_meshes(s: &dyn Store, names: &[&str]) {
    for n in names {
        s.create(mk_mesh(n)).await.expect("create mesh");
    }
}

pub async fn create_get(s: &dyn Store) {
    seed_meshes(s, &["m1"]).await;
    let r = mk_timeout("m1", "t1", &[("team", "a")], "5s");
    let created = s.create(r.clone()).await.unwrap();
    assert_eq!(created.meta.version, 1);
    assert!(created.meta.creation_time.is_some() && created.meta.modification_time.is_some());
    let got = s
        .get(&key("m1", "t1"))
        .await
        .unwrap()
        .expect("created resource is there");
    assert_eq!(got.spec, r.spec);
    assert_eq!(got.labels, r.labels);
    assert_eq!(got.meta.version, 1);
    assert!(s.get(&key("m1", "nope")).await.unwrap().is_none());
    assert!(s.get(&key("m2", "t1")).await.unwrap().is_none());
    match s.create(r).await {
        Err(Error::AlreadyExists(k)) => assert_eq!(k, key("m1", "t1")),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
}

pub async fn update_versions(s: &dyn Store) {
    seed_meshes(s, &["m1"]).await;
    let v1 = s.create(mk_timeout("m1", "t1", &[], "5s")).await.unwrap();
    let v2 = s
        .update(mk_timeout("m1", "t1", &[], "6s"), 1)
        .await
        .unwrap();
    assert_eq!(v2.meta.version, 2);
    assert_eq!(v2.meta.creation_time, v1.meta.creation_time);
    assert_eq!(
        s.get(&key("m1", "t1")).await.unwrap().unwrap().spec,
        mk_timeout("m1", "t1", &[], "6s").spec
    );
    match s.update(mk_timeout("m1", "t1", &[], "7s"), 1).await {
        Err(Error::Conflict {
            key: k,
            expected: 1,
            current: 2,
        }) => assert_eq!(k, key("m1", "t1")),
        other => panic!("expected Conflict, got {other:?}"),
    }
    // The failed update changed nothing.
    assert_eq!(
        s.get(&key("m1", "t1")).await.unwrap().unwrap().meta.version,
        2
    );
    assert!(matches!(
        s.update(mk_timeout("m1", "ghost", &[], "1s"), 1).await,
        Err(Error::NotFound(_))
    ));
}

pub async fn delete_versions(s: &dyn Store) {
    seed_meshes(s, &["m1"]).await;
    s.create(mk_timeout("m1", "t1", &[], "5s")).await.unwrap();
    s.update(mk_timeout("m1", "t1", &[], "6s"), 1)
        .await
        .unwrap();
    assert!(matches!(
        s.delete(&key("m1", "t1"), Some(1)).await,
        Err(Error::Conflict { .. })
    ));
    assert!(s.get(&key("m1", "t1")).await.unwrap().is_some());
    s.delete(&key("m1", "t1"), Some(2)).await.unwrap();
    assert!(s.get(&key("m1", "t1")).await.unwrap().is_none());
    assert!(matches!(
        s.delete(&key("m1", "t1"), None).await,
        Err(Error::NotFound(_))
    ));
    // Re-creating starts again at version 1.
    assert_eq!(
        s.create(mk_timeout("m1", "t1", &[], "5s"))
            .await
            .unwrap()
            .meta
            .version,
        1
    );
}

pub async fn mesh_delete_cascades(s: &dyn Store) {
    seed_meshes(s, &["m1", "m2"]).await;
    for i in 0..5 {
        s.create(mk_timeout("m1", &format!("t{i}"), &[], "5s"))
            .await
            .unwrap();
        s.create(mk_timeout("m2", &format!("t{i}"), &[], "5s"))
            .await
            .unwrap();
    }
    s.delete(&Key::new(Kind::Mesh, None, "m1"), None)
        .await
        .unwrap();
    assert!(
        s.list(&ListQuery::in_mesh(Kind::MeshTimeout, "m1"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        s.list(&ListQuery::in_mesh(Kind::MeshTimeout, "m2"))
            .await
            .unwrap()
            .items
            .len(),
        5
    );
    assert!(
        s.get(&Key::new(Kind::Mesh, None, "m1"))
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn list_filters(s: &dyn Store) {
    seed_meshes(s, &["a", "b"]).await;
    s.create(mk_timeout(
        "a",
        "x",
        &[("team", "red"), ("tier", "web")],
        "1s",
    ))
    .await
    .unwrap();
    s.create(mk_timeout("a", "y", &[("team", "blue")], "1s"))
        .await
        .unwrap();
    s.create(mk_timeout("b", "x", &[("team", "red")], "1s"))
        .await
        .unwrap();
    let names = |items: Vec<Resource>| {
        items
            .into_iter()
            .map(|r| format!("{}/{}", r.mesh.unwrap(), r.name))
            .collect::<Vec<_>>()
    };
    let all = s.list(&ListQuery::all(Kind::MeshTimeout)).await.unwrap();
    assert_eq!(names(all.items), ["a/x", "a/y", "b/x"]);
    assert!(all.next.is_none());
    let in_a = s
        .list(&ListQuery::in_mesh(Kind::MeshTimeout, "a"))
        .await
        .unwrap();
    assert_eq!(names(in_a.items), ["a/x", "a/y"]);
    for (sel, want) in [
        ("team=red", vec!["a/x", "b/x"]),
        ("team!=red", vec!["a/y"]),
        ("tier", vec!["a/x"]),
        ("!tier", vec!["a/y", "b/x"]),
        ("team=red,tier=web", vec!["a/x"]),
        ("team=green", vec![]),
    ] {
        let q = ListQuery {
            selector: sel.parse().unwrap(),
            ..ListQuery::all(Kind::MeshTimeout)
        };
        assert_eq!(
            names(s.list(&q).await.unwrap().items),
            want,
            "selector {sel}"
        );
    }
    let meshes = s.list(&ListQuery::all(Kind::Mesh)).await.unwrap().items;
    assert_eq!(
        meshes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(meshes.iter().all(|r| r.mesh.is_none()));
    assert!(
        s.list(&ListQuery::all(Kind::MeshRetry))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

pub async fn pagination_over_thousands(s: &dyn Store) {
    seed_meshes(s, &["p"]).await;
    const N: usize = 3000;
    let all: Vec<Resource> = (0..N)
        .map(|i| {
            mk_timeout(
                "p",
                &format!("t{i:05}"),
                &[("even", if i % 2 == 0 { "y" } else { "n" })],
                "1s",
            )
        })
        .collect();
    for chunk in all.chunks(500) {
        s.apply(chunk.to_vec(), false).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let q = ListQuery {
            limit: Some(250),
            after: after.clone(),
            ..ListQuery::in_mesh(Kind::MeshTimeout, "p")
        };
        let page = s.list(&q).await.unwrap();
        assert!(page.items.len() <= 250);
        pages += 1;
        // A write between pages must not disturb keyset pagination.
        if pages == 3 {
            s.delete(&key("p", "t00000"), None).await.unwrap();
        }
        seen.extend(page.items.into_iter().map(|r| r.name));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(pages, N / 250);
    assert_eq!(seen.len(), N);
    let want: Vec<String> = (0..N).map(|i| format!("t{i:05}")).collect();
    assert_eq!(seen, want);
    // Pagination combined with a selector.
    let q = ListQuery {
        limit: Some(400),
        selector: "even=y".parse().unwrap(),
        ..ListQuery::in_mesh(Kind::MeshTimeout, "p")
    };
    let mut count = 0;
    let mut q = q;
    loop {
        let page = s.list(&q).await.unwrap();
        assert!(page.items.iter().all(|r| r.labels["even"] == "y"));
        count += page.items.len();
        match page.next {
            Some(n) => q.after = Some(n),
            None => break,
        }
    }
    assert_eq!(count, N / 2 - 1, "t00000 was deleted");
}

pub async fn apply_outcomes(s: &dyn Store) {
    seed_meshes(s, &["m"]).await;
    let batch = vec![
        mk_timeout("m", "a", &[], "1s"),
        mk_timeout("m", "b", &[], "1s"),
    ];
    let out = s.apply(batch.clone(), true).await.unwrap();
    assert!(out.iter().all(|o| matches!(o, Outcome::Created(_))));
    assert!(
        s.get(&key("m", "a")).await.unwrap().is_none(),
        "dry run wrote nothing"
    );
    let rev0 = s.revision().await.unwrap();
    let out = s.apply(batch.clone(), false).await.unwrap();
    assert_eq!(
        out.iter().map(Outcome::action).collect::<Vec<_>>(),
        ["created", "created"]
    );
    assert_eq!(s.revision().await.unwrap(), rev0 + 2);
    let out = s
        .apply(
            vec![
                mk_timeout("m", "a", &[], "1s"),
                mk_timeout("m", "b", &[], "2s"),
                mk_timeout("m", "c", &[], "1s"),
            ],
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        out.iter().map(Outcome::action).collect::<Vec<_>>(),
        ["unchanged", "updated", "created"]
    );
    assert_eq!(out[0].resource().meta.version, 1);
    assert_eq!(out[1].resource().meta.version, 2);
    assert_eq!(
        s.get(&key("m", "b")).await.unwrap().unwrap().meta.version,
        2
    );
    assert_eq!(
        s.revision().await.unwrap(),
        rev0 + 4,
        "unchanged writes no event"
    );
    // A label change is a change.
    let out = s
        .apply(vec![mk_timeout("m", "a", &[("x", "y")], "1s")], false)
        .await
        .unwrap();
    assert_eq!(out[0].action(), "updated");
}

pub async fn concurrent_writers(s: &dyn Store) {
    seed_meshes(s, &["c"]).await;
    s.create(mk_timeout("c", "shared", &[("n", "0")], "1s"))
        .await
        .unwrap();
    const WRITERS: usize = 6;
    const EACH: usize = 15;
    let writer = |id: usize| async move {
        let mut done = 0;
        let mut conflicts = 0;
        while done < EACH {
            let cur = s.get(&key("c", "shared")).await.unwrap().unwrap();
            let n: usize = cur.labels["n"].parse().unwrap();
            let next = mk_timeout(
                "c",
                "shared",
                &[("n", &(n + 1).to_string()), ("last", &format!("w{id}"))],
                "1s",
            );
            match s.update(next, cur.meta.version).await {
                Ok(_) => done += 1,
                Err(Error::Conflict { .. }) => conflicts += 1,
                Err(e) => panic!("writer {id}: {e}"),
            }
        }
        conflicts
    };
    let conflicts: usize = join_all((0..WRITERS).map(writer)).await.into_iter().sum();
    let fin = s.get(&key("c", "shared")).await.unwrap().unwrap();
    // No lost update: every successful write incremented the counter exactly once.
    assert_eq!(fin.labels["n"], (WRITERS * EACH).to_string());
    assert_eq!(fin.meta.version as usize, 1 + WRITERS * EACH);
    let _ = conflicts;
    // Concurrent creates of one name: exactly one wins.
    let results =
        join_all((0..WRITERS).map(|_| s.create(mk_timeout("c", "race", &[], "1s")))).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        results
            .iter()
            .filter(|r| r.is_err())
            .all(|r| matches!(r, Err(Error::AlreadyExists(_))))
    );
}

pub async fn change_feed(s: &dyn Store) {
    let mut watch = s.watch();
    let start = s.revision().await.unwrap();
    seed_meshes(s, &["f"]).await;
    s.create(mk_timeout("f", "a", &[], "1s")).await.unwrap();
    s.update(mk_timeout("f", "a", &[], "2s"), 1).await.unwrap();
    s.delete(&key("f", "a"), None).await.unwrap();
    let events = s.events_since(start, 100).await.unwrap();
    let summary: Vec<(Op, Kind, u64)> = events
        .iter()
        .map(|e| (e.op, e.key.kind, e.version))
        .collect();
    assert_eq!(
        summary,
        [
            (Op::Create, Kind::Mesh, 1),
            (Op::Create, Kind::MeshTimeout, 1),
            (Op::Update, Kind::MeshTimeout, 2),
            (Op::Delete, Kind::MeshTimeout, 2)
        ]
    );
    for w in events.windows(2) {
        assert_eq!(w[1].revision, w[0].revision + 1, "revisions are contiguous");
    }
    assert_eq!(events[0].revision, start + 1);
    assert_eq!(
        events[2].resource.as_ref().unwrap().spec,
        mk_timeout("f", "a", &[], "2s").spec
    );
    assert!(events[3].resource.is_none());
    assert_eq!(s.revision().await.unwrap(), events[3].revision);
    // The watch wakes up with the latest revision (LISTEN/NOTIFY may lag a little).
    let target = events[3].revision;
    let reached = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while *watch.borrow_and_update() < target {
            if watch.changed().await.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(reached, Ok(true), "watch never reached revision {target}");
    assert!(
        s.events_since(events[3].revision, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn change_feed_resume(s: &dyn Store) {
    seed_meshes(s, &["r"]).await;
    // A consumer reads part of the feed, "disconnects", writes go on, and it resumes from
    // the last revision it saw: it must get every later event exactly once, in order.
    let mut names = Vec::new();
    for i in 0..120 {
        s.create(mk_timeout("r", &format!("e{i:03}"), &[], "1s"))
            .await
            .unwrap();
        names.push(format!("e{i:03}"));
    }
    let first = s.events_since(0, 50).await.unwrap();
    assert_eq!(first.len(), 50);
    let mut last = first.last().unwrap().revision;
    let mut got: Vec<String> = first
        .into_iter()
        .filter(|e| e.key.kind == Kind::MeshTimeout)
        .map(|e| e.key.name)
        .collect();
    for i in 120..200 {
        s.apply(vec![mk_timeout("r", &format!("e{i:03}"), &[], "1s")], false)
            .await
            .unwrap();
        names.push(format!("e{i:03}"));
    }
    loop {
        let batch = s.events_since(last, 37).await.unwrap();
        if batch.is_empty() {
            break;
        }
        assert_eq!(batch[0].revision, last + 1);
        last = batch.last().unwrap().revision;
        got.extend(batch.into_iter().map(|e| e.key.name));
    }
    assert_eq!(got, names);
}

pub async fn system_values(s: &dyn Store) {
    assert_eq!(s.system_get("k").await.unwrap(), None);
    let results = join_all(
        (0..4).map(|i| async move { s.system_init("k", &format!("v{i}")).await.unwrap() }),
    )
    .await;
    assert!(
        results.iter().all(|v| v == &results[0]),
        "all replicas agree: {results:?}"
    );
    assert_eq!(s.system_get("k").await.unwrap().as_ref(), Some(&results[0]));
    s.system_set("k", "new").await.unwrap();
    assert_eq!(s.system_get("k").await.unwrap().as_deref(), Some("new"));
    assert_eq!(s.system_init("k", "other").await.unwrap(), "new");
}

pub async fn counts(s: &dyn Store) {
    seed_meshes(s, &["a", "b"]).await;
    for i in 0..3 {
        s.create(mk_timeout("a", &format!("t{i}"), &[], "1s"))
            .await
            .unwrap();
    }
    s.create(mk_timeout("b", "t", &[], "1s")).await.unwrap();
    let counts = s.counts().await.unwrap();
    let by_mesh = super::counts_by_mesh(&counts);
    assert_eq!(by_mesh["a"][&Kind::MeshTimeout], 3);
    assert_eq!(by_mesh["b"][&Kind::MeshTimeout], 1);
    let meshes = counts.iter().find(|c| c.kind == Kind::Mesh).unwrap();
    assert_eq!((meshes.mesh.as_deref(), meshes.count), (None, 2));
}
