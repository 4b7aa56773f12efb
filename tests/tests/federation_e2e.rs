//! Multi-zone federation end to end: real `weft-global` processes on real PostgreSQL, real
//! `weft-zone` processes dialling them over KDS (TLS, zone tokens), driven by `weftctl` and
//! the REST APIs. Every outcome is awaited by polling with a deadline.
//!
//! The tests run one at a time (`SERIAL`): each starts several processes, and the machine
//! this runs on may have two cores.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_global::pg::testing::TestDb;
use weft_tests::api::{
    self, DATAPLANES, TIMEOUTS, timeout_path, wait_absent, wait_global_dataplane, wait_names,
    wait_present, wait_same_specs, wait_spec,
};
use weft_tests::proxy::Proxy;
use weft_tests::{Backend, Global, Zone, eventually, ok};

/// How long a change may take to reach a zone (or global) in these tests.
const SYNC: Duration = Duration::from_secs(30);
/// How long a zone may take to come back after global returns (its backoff grows while
/// global is away, up to 30s).
const RECONNECT: Duration = Duration::from_secs(60);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn postgres_global(args: &[&str]) -> (TestDb, Global) {
    let db = TestDb::create().await.unwrap();
    let g = Global::builder(Backend::Postgres(db.url().to_string()))
        .args(args)
        .start()
        .await
        .unwrap();
    (db, g)
}

/// A MeshTimeout document (YAML) for `weftctl apply`.
fn timeout_yaml(name: &str, secs: u32) -> String {
    format!(
        "type: MeshTimeout\nname: {name}\nmesh: default\nspec:\n  targetRef: {{kind: Mesh}}\n  to:\n    - targetRef: {{kind: Mesh}}\n      default: {{connectionTimeout: {secs}s}}\n"
    )
}

/// The spec global stores for [`timeout_yaml`] / [`api::timeout`].
fn timeout_spec(secs: u32) -> Value {
    api::timeout("x", secs)["spec"].clone()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(ToString::to_string).collect()
}

/// Issue a zone token with `weftctl generate zone-token`; returns (token, id).
fn weftctl_token(g: &Global, zone: &str, valid_for: &str) -> (String, String) {
    let out = g.weftctl(&[
        "generate",
        "zone-token",
        "--zone",
        zone,
        "--valid-for",
        valid_for,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let token = ok(out).trim().to_string();
    let id = weft_core::token::inspect(&token)
        .unwrap_or_else(|e| panic!("weftctl printed no token ({e}); stderr: {stderr}"))
        .jti;
    assert!(stderr.contains(&id), "{stderr}");
    (token, id)
}

/// Wait until the zone holds the `default` mesh (synced from global): it accepts
/// dataplanes from then on.
async fn wait_mesh(z: &Zone) {
    wait_present(&z.api(), "/meshes/default", SYNC).await;
}

/// Wait until a series of the zone's `/metrics` has exactly this value (a counter that
/// overshoots never gets there: the wait fails and names the last value).
async fn wait_metric(z: &Zone, series: &str, want: f64) {
    let mut last = None;
    let deadline = Instant::now() + SYNC;
    while Instant::now() < deadline {
        last = z.metric(series).await;
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("zone {}: {series} is {last:?}, expected {want}", z.name);
}

/// Wait until `needle` appears in the zone's log at least `n` times.
async fn wait_log_count(z: &Zone, needle: &str, n: usize, timeout: Duration) {
    eventually(
        &format!("{n} lines with {needle:?} in zone {}'s log", z.name),
        timeout,
        || async { (z.logs().matches(needle).count() >= n).then_some(()) },
    )
    .await
}

// ---------------------------------------------------------------------------------------
// 1. Policies flow to every zone, dataplanes to global.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reach_every_zone_and_dataplanes_reach_global() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let (_db, g) = postgres_global(&[]).await;
    let (token_a, _) = weftctl_token(&g, "a", "1h");
    let a = Zone::builder("a")
        .global(&g)
        .token(&token_a)
        .start()
        .await
        .unwrap();
    let b = Zone::join("b", &g, &[]).await.unwrap();
    // Zone c pins the CA's fingerprint (as global logged it) instead of the CA file.
    let fp = g.fingerprint().unwrap();
    assert_eq!(g.logged_fingerprint().as_deref(), Some(fp.as_str()));
    let c = Zone::builder("c")
        .fingerprint(&fp)
        .address(g.kds_address())
        .token(&g.zone_token("c", "1h").await.unwrap().token)
        .start()
        .await
        .unwrap();
    let zones = [&a, &b, &c];
    for z in zones {
        wait_mesh(z).await;
    }

    // Create, update, delete a MeshTimeout on global: each step reaches all 3 zones.
    let dir = g.data_dir.path();
    let out = ok(g.weftctl(&["apply", "-f", &write(dir, "t.yaml", &timeout_yaml("t1", 3))]));
    assert!(out.contains("created: 1"), "{out}");
    for z in zones {
        let doc = wait_spec(&z.api(), &timeout_path("t1"), &timeout_spec(3), SYNC).await;
        assert_eq!(doc["labels"]["weft.io/origin"], "global", "{doc}");
    }
    let out = ok(g.weftctl(&["apply", "-f", &write(dir, "t.yaml", &timeout_yaml("t1", 7))]));
    assert!(out.contains("updated: 1"), "{out}");
    for z in zones {
        wait_spec(&z.api(), &timeout_path("t1"), &timeout_spec(7), SYNC).await;
    }
    ok(g.weftctl(&["delete", "meshtimeout", "t1"]));
    for z in zones {
        wait_absent(&z.api(), &timeout_path("t1"), SYNC).await;
    }

    // A dataplane registered in zone a (the fixture claims `weft.io/zone: east`) reaches
    // global as `backend-1.a`, stamped with zone a and origin zone.
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../core/tests/fixtures/dataplane.yaml"
    );
    ok(a.weftctl(&["apply", "-f", fixture]));
    let dp = wait_global_dataplane(&g.api(), "a", "backend-1", SYNC).await;
    assert_eq!(dp["name"], "backend-1.a", "{dp}");
    assert_eq!(dp["labels"]["weft.io/zone"], "a", "{dp}");
    assert_eq!(dp["labels"]["weft.io/origin"], "zone", "{dp}");
    assert_eq!(dp["spec"]["networking"]["address"], "10.0.1.15", "{dp}");
    // One claiming zone b (and origin global) is still zone a's on global.
    a.api()
        .apply(&[api::dataplane(
            "claims-b",
            7,
            &[("weft.io/zone", "b"), ("weft.io/origin", "global")],
        )])
        .await
        .unwrap();
    let dp = wait_global_dataplane(&g.api(), "a", "claims-b", SYNC).await;
    assert_eq!(dp["labels"]["weft.io/origin"], "zone", "{dp}");
    // Zone b's own dataplane, to check the exact set on global.
    b.api()
        .apply(&[api::dataplane("web-1", 8, &[])])
        .await
        .unwrap();
    wait_names(
        &g.api(),
        DATAPLANES,
        &set(&["backend-1.a", "claims-b.a", "web-1.b"]),
        SYNC,
    )
    .await;
    // Zone b never received zone a's dataplanes (they flow to global only).
    assert_eq!(
        b.api().names(DATAPLANES).await.unwrap(),
        set(&["web-1"]),
        "zone b's dataplanes"
    );

    // `weftctl inspect zones`: all three online.
    eventually("weftctl inspect zones: a, b, c online", SYNC, || async {
        let out = g.weftctl(&["inspect", "zones"]);
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        let online = |z: &str| {
            table
                .lines()
                .any(|l| l.split_whitespace().take(2).eq([z, "online"]))
        };
        (out.status.success() && online("a") && online("b") && online("c")).then_some(())
    })
    .await;
    eprintln!(
        "policies_reach_every_zone_and_dataplanes_reach_global: {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 2. Global down: writes fail clearly, zones serve what they hold, zone changes catch up.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_outage_zones_keep_serving_and_catch_up() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let (_db, mut g) = postgres_global(&[]).await;
    let docs: Vec<Value> = (0..10)
        .map(|i| api::timeout(&format!("t{i}"), 1 + i))
        .collect();
    g.api().apply(&docs).await.unwrap();
    let a = Zone::join("a", &g, &[]).await.unwrap();
    let b = Zone::join("b", &g, &[]).await.unwrap();
    for z in [&a, &b] {
        wait_same_specs(&g.api(), &z.api(), TIMEOUTS, SYNC).await;
    }
    let policies = g.api().specs(TIMEOUTS).await.unwrap();
    assert_eq!(policies.len(), 10);
    let dps: Vec<Value> = (1..=3)
        .map(|i| api::dataplane(&format!("dp-{i}"), i, &[]))
        .collect();
    a.api().apply(&dps).await.unwrap();
    wait_names(
        &g.api(),
        DATAPLANES,
        &set(&["dp-1.a", "dp-2.a", "dp-3.a"]),
        SYNC,
    )
    .await;

    g.kill9();
    // 20 policy changes: each refused, naming the address that did not answer.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..20 {
        let file = write(dir.path(), "p.yaml", &timeout_yaml(&format!("down-{i}"), 2));
        let out = g.weftctl(&["apply", "-f", &file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "apply {i} succeeded with global down"
        );
        assert!(
            stderr.contains("cannot connect to the control plane") && stderr.contains(&g.url()),
            "apply {i}: {stderr}"
        );
    }
    // Zones serve what they hold, and take their own changes: 5 new dataplanes, 1 deleted.
    for z in [&a, &b] {
        assert_eq!(
            z.api().specs(TIMEOUTS).await.unwrap(),
            policies,
            "zone {}",
            z.name
        );
        eventually(
            &format!("zone {} to notice global is gone", z.name),
            SYNC,
            || async { (z.connected().await == Some(false)).then_some(()) },
        )
        .await;
    }
    let new: Vec<Value> = (4..=8)
        .map(|i| api::dataplane(&format!("dp-{i}"), i, &[]))
        .collect();
    a.api().apply(&new).await.unwrap();
    a.api().delete(&format!("{DATAPLANES}/dp-1")).await.unwrap();
    assert_eq!(
        a.api().specs(TIMEOUTS).await.unwrap(),
        policies,
        "zone a after its own changes"
    );

    g.restart().await.unwrap();
    let want = set(&[
        "dp-2.a", "dp-3.a", "dp-4.a", "dp-5.a", "dp-6.a", "dp-7.a", "dp-8.a",
    ]);
    wait_names(&g.api(), DATAPLANES, &want, RECONNECT).await;
    // Exactly once each, all of zone a.
    let items = g.api().list(DATAPLANES).await.unwrap();
    assert_eq!(items.len(), want.len(), "{items:?}");
    assert!(items.iter().all(|d| d["labels"]["weft.io/zone"] == "a"));
    // None of the refused writes happened; zones still hold exactly global's policies.
    assert_eq!(g.api().specs(TIMEOUTS).await.unwrap(), policies);
    for z in [&a, &b] {
        z.wait_synced(RECONNECT).await;
        wait_same_specs(&g.api(), &z.api(), TIMEOUTS, SYNC).await;
    }
    // And the link works again: a change made now reaches both zones.
    g.api().apply(&[api::timeout("after", 9)]).await.unwrap();
    for z in [&a, &b] {
        wait_spec(&z.api(), &timeout_path("after"), &timeout_spec(9), SYNC).await;
    }
    eprintln!(
        "global_outage_zones_keep_serving_and_catch_up: {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 3. A zone restarted with an empty store resyncs fully.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_zone_resyncs_everything() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let (_db, g) = postgres_global(&[]).await;
    let docs: Vec<Value> = (0..20)
        .map(|i| api::timeout(&format!("t{i}"), 1 + i))
        .collect();
    g.api().apply(&docs).await.unwrap();
    let mut a = Zone::join("a", &g, &[]).await.unwrap();
    wait_same_specs(&g.api(), &a.api(), TIMEOUTS, SYNC).await;
    a.api()
        .apply(&[api::dataplane("dp-1", 1, &[])])
        .await
        .unwrap();
    wait_global_dataplane(&g.api(), "a", "dp-1", SYNC).await;

    a.kill9();
    // While the zone is away: 5 deleted, 5 updated, 5 created, and a new mesh.
    for i in 0..5 {
        g.api()
            .delete(&timeout_path(&format!("t{i}")))
            .await
            .unwrap();
    }
    let mut changes: Vec<Value> = (5..10)
        .map(|i| api::timeout(&format!("t{i}"), 30 + i))
        .collect();
    changes.extend((20..25).map(|i| api::timeout(&format!("t{i}"), 1 + i)));
    changes.push(json!({"type": "Mesh", "name": "away", "spec": {}}));
    g.api().apply(&changes).await.unwrap();

    a.restart().await.unwrap();
    wait_same_specs(&g.api(), &a.api(), TIMEOUTS, SYNC).await;
    wait_same_specs(&g.api(), &a.api(), "/meshes", SYNC).await;
    let names = a.api().names(TIMEOUTS).await.unwrap();
    assert_eq!(names.len(), 20, "{names:?}");
    for i in 0..5 {
        assert!(
            !names.contains(&format!("t{i}")),
            "t{i} was deleted on global"
        );
    }
    assert_eq!(
        a.api().get(&timeout_path("t7")).await.unwrap().unwrap()["spec"],
        timeout_spec(37)
    );
    // A full resync into an empty store: every policy sent once, nothing to delete.
    let series = "weft_kds_resources_sent_total{direction=\"global_to_zone\",kind=\"MeshTimeout\"}";
    wait_metric(&a, series, 20.0).await;
    // The zone came back without dp-1 (its store is in memory): global drops it too, since
    // the zone's reconciliation says what it holds now.
    wait_names(&g.api(), DATAPLANES, &BTreeSet::new(), SYNC).await;
    eprintln!("restarted_zone_resyncs_everything: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// 4. Two global replicas on one database; a zone fails over.

/// The KDS address (`host:port`) the zone's log last says it connected to.
fn connected_to(z: &Zone) -> Option<String> {
    let logs = z.logs();
    let line = logs
        .lines()
        .rev()
        .find(|l| l.contains("connected to global"))?;
    let at = line.find("address=")? + "address=".len();
    let address = line[at..].split_whitespace().next()?;
    Some(
        address
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_fail_over_between_two_replicas() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let (_db, mut r1) = postgres_global(&[]).await;
    let r2 = r1.replica().await.unwrap();
    assert_eq!(
        r1.fingerprint().unwrap(),
        r2.fingerprint().unwrap(),
        "one CA"
    );
    let a = Zone::builder("a")
        .global(&r1)
        .global(&r2)
        .token(&r1.zone_token("a", "1h").await.unwrap().token)
        .start()
        .await
        .unwrap();
    // Issued through replica 2: replicas share the signing key.
    let b = Zone::builder("b")
        .global(&r2)
        .global(&r1)
        .token(&r2.zone_token("b", "1h").await.unwrap().token)
        .start()
        .await
        .unwrap();
    a.wait_synced(SYNC).await;
    b.wait_synced(SYNC).await;
    assert_eq!(connected_to(&a), Some(r1.kds_address()), "{}", a.logs());
    assert_eq!(connected_to(&b), Some(r2.kds_address()), "{}", b.logs());

    // Written through replica 1, served to zone b by replica 2.
    r1.api().apply(&[api::timeout("p1", 1)]).await.unwrap();
    for z in [&a, &b] {
        wait_spec(&z.api(), &timeout_path("p1"), &timeout_spec(1), SYNC).await;
    }
    // A dataplane of zone b, received by replica 2, is visible through replica 1.
    b.api()
        .apply(&[api::dataplane("web-1", 1, &[])])
        .await
        .unwrap();
    wait_global_dataplane(&r1.api(), "b", "web-1", SYNC).await;

    r1.kill9();
    eventually("zone a to move to replica 2", RECONNECT, || async {
        (connected_to(&a) == Some(r2.kds_address())).then_some(())
    })
    .await;
    r2.api().apply(&[api::timeout("p2", 2)]).await.unwrap();
    for z in [&a, &b] {
        wait_spec(&z.api(), &timeout_path("p2"), &timeout_spec(2), SYNC).await;
    }
    // And zone a's changes reach global through replica 2.
    a.api()
        .apply(&[api::dataplane("api-1", 2, &[])])
        .await
        .unwrap();
    wait_names(&r2.api(), DATAPLANES, &set(&["api-1.a", "web-1.b"]), SYNC).await;
    wait_same_specs(&r2.api(), &a.api(), TIMEOUTS, SYNC).await;
    eprintln!(
        "zones_fail_over_between_two_replicas: {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 5. Tokens and zones global refuses.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_a_clear_error() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let (_db, g) = postgres_global(&[]).await;
    // A healthy zone, to tell "did not arrive" from "not yet".
    let ok_zone = Zone::join("ok", &g, &[]).await.unwrap();

    // Expired: issued for 1s, used once its expiry has passed.
    let (expired, _) = weftctl_token(&g, "e", "1s");
    let exp = weft_core::token::inspect(&expired).unwrap().exp;
    eventually("the 1s token to expire", Duration::from_secs(5), || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        (now > exp).then_some(())
    })
    .await;
    let e = Zone::builder("e")
        .global(&g)
        .token(&expired)
        .start()
        .await
        .unwrap();

    // Wrong zone: a token for x used by a zone that calls itself y.
    let wrong = g.zone_token("x", "1h").await.unwrap();
    let y = Zone::builder("y")
        .global(&g)
        .token(&wrong.token)
        .start()
        .await
        .unwrap();

    // No token file, and an empty one.
    let missing = Zone::builder("m")
        .global(&g)
        .missing_token_file()
        .start()
        .await
        .unwrap();
    let empty = Zone::builder("n")
        .global(&g)
        .token("")
        .start()
        .await
        .unwrap();

    // Revoked while connected.
    let (token_r, id_r) = weftctl_token(&g, "r", "1h");
    let r = Zone::builder("r")
        .global(&g)
        .token(&token_r)
        .start()
        .await
        .unwrap();
    r.wait_synced(SYNC).await;
    g.api().apply(&[api::timeout("before", 1)]).await.unwrap();
    wait_present(&r.api(), &timeout_path("before"), SYNC).await;
    let revoked_at = Instant::now();
    ok(g.weftctl(&["revoke", "zone-token", &id_r]));
    eventually("zone r cut off after revocation", SYNC, || async {
        (r.connected().await == Some(false)).then_some(())
    })
    .await;
    let cut_off = revoked_at.elapsed();
    assert!(
        cut_off < Duration::from_secs(10),
        "cut off after {cut_off:?}"
    );
    r.wait_log(
        &format!("zone token {id_r} for zone \"r\" was revoked"),
        SYNC,
    )
    .await;

    // Each refusal is in the zone's log, saying why.
    e.wait_log(
        "global refused the stream: zone token for \"e\": expired at",
        SYNC,
    )
    .await;
    y.wait_log(
        "the zone token is for zone \"x\", but this zone calls itself \"y\"",
        SYNC,
    )
    .await;
    missing
        .wait_log(
            &format!(
                "reading the zone token {}: No such file or directory",
                missing.token_file.display()
            ),
            SYNC,
        )
        .await;
    // An empty file is refused by the zone itself, before dialling, naming the file.
    empty
        .wait_log(
            "is empty (put the token from `weftctl generate zone-token --zone",
            SYNC,
        )
        .await;

    // None of them gets anything from global, and they keep being refused: a policy
    // written now reaches the healthy zone, and each refused zone logs a refusal after it
    // without receiving it.
    g.api().apply(&[api::timeout("after", 2)]).await.unwrap();
    wait_present(&ok_zone.api(), &timeout_path("after"), SYNC).await;
    let refused = [
        (&e, "expired at"),
        (&y, "calls itself"),
        (&missing, "reading the zone token"),
        (&empty, "is empty (put the token"),
        (&r, "was revoked"),
    ];
    let counts: Vec<usize> = refused
        .iter()
        .map(|(z, needle)| z.logs().matches(needle).count())
        .collect();
    for ((z, needle), n) in refused.iter().zip(counts) {
        wait_log_count(z, needle, n + 1, RECONNECT).await;
        let logs = z.logs();
        let line = logs
            .lines()
            .rev()
            .find(|l| l.contains(needle))
            .unwrap_or("");
        eprintln!("zone {} refused: {line}", z.name);
        assert_eq!(z.connected().await, Some(false), "zone {}", z.name);
        assert_eq!(
            z.api().get(&timeout_path("after")).await.unwrap(),
            None,
            "zone {} received a policy",
            z.name
        );
    }
    for z in [&e, &y, &missing, &empty] {
        assert_eq!(
            z.api().get("/meshes/default").await.unwrap(),
            None,
            "zone {} received the default mesh",
            z.name
        );
    }
    // Global made no Zone for any refused connection.
    for name in ["e", "x", "y", "m", "n"] {
        assert_eq!(
            g.api().get(&format!("/zones/{name}")).await.unwrap(),
            None,
            "zone {name} on global"
        );
    }
    eprintln!(
        "bad_tokens_are_refused_with_a_clear_error: {:?} (revoked zone cut off after {cut_off:?})",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_zone_is_cut_off_and_deleted_zone_loses_its_dataplanes() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let (_db, g) = postgres_global(&[]).await;
    let mut a = Zone::join("a", &g, &[]).await.unwrap();
    let b = Zone::join("b", &g, &[]).await.unwrap();
    for z in [&a, &b] {
        wait_mesh(z).await;
    }
    a.api()
        .apply(&[
            api::dataplane("dp-1", 1, &[]),
            api::dataplane("dp-2", 2, &[]),
        ])
        .await
        .unwrap();
    b.api()
        .apply(&[api::dataplane("web-1", 3, &[])])
        .await
        .unwrap();
    wait_names(
        &g.api(),
        DATAPLANES,
        &set(&["dp-1.a", "dp-2.a", "web-1.b"]),
        SYNC,
    )
    .await;

    // Disable zone a: cut off within seconds, refused on every reconnect.
    let dir = g.data_dir.path();
    let zone_yaml = "type: Zone\nname: a\nspec:\n  enabled: false\n";
    ok(g.weftctl(&["apply", "-f", &write(dir, "zone.yaml", zone_yaml)]));
    eventually("zone a cut off", SYNC, || async {
        (a.connected().await == Some(false)).then_some(())
    })
    .await;
    a.wait_log(
        "global ended the stream: zone \"a\" is disabled (Zone.spec.enabled: false)",
        SYNC,
    )
    .await;
    g.api().apply(&[api::timeout("later", 4)]).await.unwrap();
    wait_present(&b.api(), &timeout_path("later"), SYNC).await;
    // Refused on reconnect, again after the policy was written.
    let refusal = "global refused the stream: zone \"a\" is disabled";
    let n = a.logs().matches(refusal).count();
    wait_log_count(&a, refusal, n + 1, RECONNECT).await;
    assert_eq!(a.connected().await, Some(false));
    assert_eq!(a.api().get(&timeout_path("later")).await.unwrap(), None);
    eventually("inspect zones: a disabled", SYNC, || async {
        let out = g.weftctl(&["inspect", "zones"]);
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        table
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["a", "disabled"]))
            .then_some(())
    })
    .await;
    // Its dataplanes stay on global while it is only disabled.
    assert_eq!(
        g.api().names(DATAPLANES).await.unwrap(),
        set(&["dp-1.a", "dp-2.a", "web-1.b"])
    );

    // Stop zone a, then delete its Zone: what it owned goes from global, zone b's stays.
    a.kill9();
    ok(g.weftctl(&["delete", "zone", "a"]));
    wait_names(&g.api(), DATAPLANES, &set(&["web-1.b"]), SYNC).await;
    assert_eq!(g.api().get("/zones/a").await.unwrap(), None);
    eprintln!(
        "disabled_zone_is_cut_off_and_deleted_zone_loses_its_dataplanes: {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 6. Chunking: 100,000 resources of one kind.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_policies_sync_to_a_fresh_zone() {
    const N: usize = 100_000;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let (_db, g) = postgres_global(&[]).await;
    for chunk in (0..N).collect::<Vec<_>>().chunks(2_000) {
        let docs: Vec<Value> = chunk
            .iter()
            .map(|i| api::timeout(&format!("t-{i:06}"), 1 + (*i % 50) as u32))
            .collect();
        g.api().apply(&docs).await.unwrap();
    }
    let loaded = started.elapsed();

    let sync_started = Instant::now();
    let z = Zone::join("fresh", &g, &[]).await.unwrap();
    eventually(
        "the zone to hold 100,000 MeshTimeouts",
        Duration::from_secs(120),
        || async {
            let v = z.api().get("/_inspect/meshes").await.ok()??;
            let n = v["items"]
                .as_array()?
                .iter()
                .find(|m| m["mesh"] == "default")?["counts"]["MeshTimeout"]
                .as_u64()?;
            (n == N as u64).then_some(())
        },
    )
    .await;
    let synced = sync_started.elapsed();

    let list_started = Instant::now();
    let items = z.api().list(TIMEOUTS).await.unwrap();
    let listed = list_started.elapsed();
    assert_eq!(items.len(), N);
    let names: BTreeSet<String> = items
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = (0..N).map(|i| format!("t-{i:06}")).collect();
    assert_eq!(names, want);
    let spot = items
        .iter()
        .find(|i| i["name"] == "t-054321")
        .expect("t-054321");
    assert_eq!(spot["spec"], timeout_spec(1 + 54321 % 50));
    // Every one was sent once: the reconciliation did not repeat itself.
    wait_metric(
        &z,
        "weft_kds_resources_sent_total{direction=\"global_to_zone\",kind=\"MeshTimeout\"}",
        N as f64,
    )
    .await;
    eprintln!(
        "hundred_thousand_policies_sync_to_a_fresh_zone: load {loaded:?}, sync {synced:?}, list {listed:?}, total {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 7. A silently stalled connection is detected and replaced.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connection_is_detected_and_replaced() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let live = ["--kds-ping-interval", "500ms", "--kds-stall-timeout", "3s"];
    let (_db, g) = postgres_global(&live).await;
    let proxy = Proxy::start(g.kds_address()).await.unwrap();
    let z = Zone::builder("a")
        .address(proxy.address())
        .ca_file(g.ca_file())
        .token(&g.zone_token("a", "1h").await.unwrap().token)
        .args(&live)
        .start()
        .await
        .unwrap();
    z.wait_synced(SYNC).await;
    g.api().apply(&[api::timeout("before", 1)]).await.unwrap();
    wait_present(&z.api(), &timeout_path("before"), SYNC).await;
    let reconnects = z.metric("weft_kds_reconnects_total").await.unwrap();

    let frozen_at = Instant::now();
    let frozen = proxy.freeze_current();
    assert!(frozen >= 1, "no connection through the proxy");
    // A change written during the stall cannot pass the frozen connection...
    g.api().apply(&[api::timeout("during", 2)]).await.unwrap();
    eventually("the zone to reconnect", SYNC, || async {
        let n = z.metric("weft_kds_reconnects_total").await?;
        (n > reconnects).then_some(())
    })
    .await;
    let detected = frozen_at.elapsed();
    z.wait_log("stream stalled", Duration::from_secs(5)).await;
    // ...and arrives over the new one, as does a change written after it.
    wait_spec(&z.api(), &timeout_path("during"), &timeout_spec(2), SYNC).await;
    g.api().apply(&[api::timeout("after", 3)]).await.unwrap();
    wait_spec(&z.api(), &timeout_path("after"), &timeout_spec(3), SYNC).await;
    assert!(proxy.connections() > frozen, "no new connection");
    // The stall timeout (3s), not HTTP/2 keepalive (10s + 10s), found it.
    assert!(
        detected < Duration::from_secs(10),
        "stall detected after {detected:?}"
    );
    eprintln!(
        "stalled_connection_is_detected_and_replaced: detected after {detected:?}, total {:?}",
        started.elapsed()
    );
}
