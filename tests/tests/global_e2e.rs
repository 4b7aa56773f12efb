//! weft-global as a real process on real PostgreSQL, driven by the real weftctl.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use weft_global::pg::testing::{TempServer, TestDb};
use weft_tests::{Backend, Global, eventually, fixtures, ok};

/// Every resource of every global-writable kind, as the API lists it: key -> document.
async fn snapshot(g: &Global) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for kind in fixtures::global_kinds() {
        let mut next: Option<String> = None;
        loop {
            let mut path = format!("/{}?size=1000", kind.plural());
            if let Some(n) = &next {
                path.push_str(&format!("&next={n}"));
            }
            let r = g.req(Method::GET, &path).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let page: Value = r.json().await.unwrap();
            for item in page["items"].as_array().unwrap() {
                let key = format!("{}/{}/{}", item["type"], item["mesh"], item["name"]);
                out.insert(key, item.clone());
            }
            match page["next"].as_str() {
                Some(n) => next = Some(n.to_string()),
                None => break,
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_50_of_every_kind_survives_kill_9() {
    let db = TestDb::create().await.unwrap();
    let mut g = Global::start(Backend::Postgres(db.url().to_string()))
        .await
        .unwrap();
    let file = g.data_dir.path().join("all.yaml");
    std::fs::write(&file, fixtures::every_kind(50, "default")).unwrap();
    let out = ok(g.weftctl(&["apply", "-f", file.to_str().unwrap()]));
    let kinds = fixtures::global_kinds().len();
    // 50 meshes are among them, plus the default mesh made on first start.
    assert!(out.contains(&format!("created: {}", 50 * kinds)), "{out}");
    let before = snapshot(&g).await;
    assert_eq!(before.len(), 50 * kinds + 1);
    g.kill9();
    g.restart().await.unwrap();
    let after = snapshot(&g).await;
    assert_eq!(before.len(), after.len());
    for (k, v) in &before {
        assert_eq!(Some(v), after.get(k), "{k} changed across kill -9");
    }
    // Applying the same file again changes nothing.
    let out = ok(g.weftctl(&["apply", "-f", file.to_str().unwrap()]));
    assert!(out.contains(&format!("unchanged: {}", 50 * kinds)), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_a_running_global() {
    let pg = TempServer::create().await.unwrap();
    let g = Global::start(Backend::Postgres(pg.url())).await.unwrap();
    let file = g.data_dir.path().join("t.yaml");
    std::fs::write(&file, fixtures::timeouts(20, "default")).unwrap();
    ok(g.weftctl(&["apply", "-f", file.to_str().unwrap()]));
    pg.restart().await.unwrap();
    // The very next requests succeed, without restarting global.
    let r = g
        .req(Method::GET, "/meshes/default/meshtimeouts?size=1000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 20);
    std::fs::write(&file, fixtures::timeouts(30, "default")).unwrap();
    let out = ok(g.weftctl(&["apply", "-f", file.to_str().unwrap()]));
    assert!(out.contains("created: 10"), "{out}");
    // While Postgres is down, requests fail with a clear 503 and readiness says so.
    pg.stop().await.unwrap();
    let r = g
        .req(Method::GET, "/meshes/default/meshtimeouts")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("store unavailable"),
        "{body}"
    );
    let ready = weft_tests::client()
        .get(format!("{}/readyz", g.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    pg.start().await.unwrap();
    eventually(
        "readiness after Postgres returns",
        Duration::from_secs(20),
        || async {
            let r = weft_tests::client()
                .get(format!("{}/readyz", g.url()))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    let r = g
        .req(Method::GET, "/meshes/default/meshtimeouts?size=1000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weftctl_reports_bad_input_with_the_field_and_fails() {
    let g = Global::start(Backend::Memory).await.unwrap();
    let file = g.data_dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "type: MeshTimeout\nname: ok\nmesh: default\nspec:\n  to:\n    - targetRef: {kind: Mesh}\n      default: {idleTimeout: 1s}\n---\ntype: MeshTimeout\nname: bad\nmesh: default\nspec:\n  to:\n    - targetRef: {kind: Mesh}\n      default: {http: {requestTimeout: 5 seconds}}\n",
    )
    .unwrap();
    let out = g.weftctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.to[0].default.http.requestTimeout"),
        "{stderr}"
    );
    assert!(
        stderr.contains("invalid duration \"5 seconds\""),
        "{stderr}"
    );
    // Nothing was applied, not even the valid first document.
    let r = g
        .req(Method::GET, "/meshes/default/meshtimeouts")
        .send()
        .await
        .unwrap();
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
    // get of a missing resource: non-zero exit, the server's message.
    let out = g.weftctl(&["get", "meshtimeout", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weftctl_tour_against_a_real_global() {
    let g = Global::start(Backend::Memory).await.unwrap();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
    let out = ok(g.weftctl(&["apply", "-f", examples]));
    assert!(out.contains("created:"), "{out}");
    let table = ok(g.weftctl(&["get", "meshtimeouts"]));
    assert!(table.contains("backend-timeouts"), "{table}");
    let yaml = ok(g.weftctl(&["get", "meshtimeout", "backend-timeouts", "-o", "yaml"]));
    assert!(yaml.contains("requestTimeout: 5s"), "{yaml}");
    let parsed = weft_core::document::parse(&yaml).unwrap();
    assert_eq!(parsed[0].name, "backend-timeouts");
    let json = ok(g.weftctl(&["get", "meshes", "-o", "json"]));
    let v: Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "payments")
    );
    let inspect = ok(g.weftctl(&["inspect", "meshes"]));
    assert!(
        inspect.contains("default") && inspect.contains("payments"),
        "{inspect}"
    );
    ok(g.weftctl(&["delete", "meshtimeout", "backend-timeouts"]));
    let out = g.weftctl(&["get", "meshtimeout", "backend-timeouts"]);
    assert!(!out.status.success());
}
