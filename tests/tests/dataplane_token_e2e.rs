//! Dataplane tokens end to end: real `weft-global` issues them (through `weftctl`), a real
//! `weft-zone` checks them with the token keys and revocations it obtained over KDS
//! `GetTrust`, also after global is gone. Every outcome is awaited by polling with a
//! deadline.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use weft_tests::{Backend, Global, Zone, eventually, ok};

const SYNC: Duration = Duration::from_secs(30);

/// `POST /_tokens/dataplane/verify` on the zone: `Ok(())` or the refusal's detail.
async fn verify(
    zone: &Zone,
    token: &str,
    mesh: &str,
    name: &str,
    service: &str,
) -> Result<(), String> {
    let r = zone
        .api()
        .req(Method::POST, "/_tokens/dataplane/verify")
        .json(&json!({"token": token, "mesh": mesh, "name": name, "service": service}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    match status {
        StatusCode::OK => {
            assert_eq!(body, json!({"ok": true}));
            Ok(())
        }
        StatusCode::FORBIDDEN => Err(body["detail"].as_str().unwrap().to_string()),
        other => panic!("unexpected answer {other}: {body}"),
    }
}

fn generate(g: &Global, args: &[&str]) -> String {
    let mut all = vec!["generate", "dataplane-token"];
    all.extend_from_slice(args);
    let out = ok(g.weftctl(&all));
    assert_eq!(out.lines().count(), 1, "only the token: {out}");
    out.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_checks_dataplane_tokens_issued_on_global() {
    let mut g = Global::start(Backend::Memory).await.unwrap();
    let zone = Zone::join("east", &g, &[]).await.unwrap();
    g.api()
        .apply(&[json!({"type": "Mesh", "name": "payments", "spec": {}})])
        .await
        .unwrap();
    let token = generate(
        &g,
        &[
            "--mesh",
            "default",
            "--name",
            "web-1",
            "--service",
            "web",
            "--valid-for",
            "24h",
        ],
    );

    // The zone obtains global's trust after connecting: the right token is accepted.
    eventually("the zone accepts a valid dataplane token", SYNC, || async {
        verify(&zone, &token, "default", "web-1", "web").await.ok()
    })
    .await;
    // Presented for another service, mesh or dataplane: refused with the reason.
    assert_eq!(
        verify(&zone, &token, "default", "web-1", "api")
            .await
            .unwrap_err(),
        r#"dataplane token for "web-1" in mesh "default": issued for service "web", not "api""#
    );
    assert_eq!(
        verify(&zone, &token, "payments", "web-1", "web")
            .await
            .unwrap_err(),
        r#"dataplane token for "web-1" in mesh "default": issued for mesh "default", not "payments""#
    );
    assert_eq!(
        verify(&zone, &token, "default", "web-2", "web")
            .await
            .unwrap_err(),
        r#"dataplane token for "web-1" in mesh "default": issued for dataplane "web-1", not "web-2""#
    );
    // A zone token is not a dataplane token; garbage is not one either.
    let zone_token = g.zone_token("east", "1h").await.unwrap().token;
    let e = verify(&zone, &zone_token, "default", "web-1", "web")
        .await
        .unwrap_err();
    assert!(e.starts_with("malformed dataplane token"), "{e}");
    assert!(
        verify(&zone, "nope", "default", "web-1", "web")
            .await
            .is_err()
    );
    // Without the admin token the route answers nothing.
    let r = weft_tests::client()
        .post(format!("{}/_tokens/dataplane/verify", zone.url()))
        .json(&json!({"token": token, "mesh": "default", "name": "web-1", "service": "web"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Expired.
    let short = generate(
        &g,
        &[
            "--mesh",
            "default",
            "--name",
            "web-1",
            "--service",
            "web",
            "--valid-for",
            "1s",
        ],
    );
    let e = eventually("the 1s token expires", SYNC, || async {
        verify(&zone, &short, "default", "web-1", "web").await.err()
    })
    .await;
    assert!(e.contains("expired at"), "{e}");

    // Global refuses bad requests by field, and meshes that do not exist.
    for (body, field) in [
        (
            json!({"mesh": "nope", "name": "web-1", "service": "web"}),
            "mesh",
        ),
        (
            json!({"mesh": "default", "name": "Web", "service": "web"}),
            "name",
        ),
        (
            json!({"mesh": "default", "name": "web-1", "service": ""}),
            "service",
        ),
        (
            json!({"mesh": "default", "name": "web-1", "service": "web", "validFor": "1d"}),
            "validFor",
        ),
    ] {
        let r = g
            .req(Method::POST, "/_tokens/dataplane")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["field"], field, "{v}");
    }
    let out = g.weftctl(&[
        "generate",
        "dataplane-token",
        "--mesh",
        "nope",
        "--name",
        "a",
        "--service",
        "s",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{out:?}"
    );

    // Revoked on global: the zone refuses it within a refresh.
    let revoked = generate(
        &g,
        &["--mesh", "payments", "--name", "pay-1", "--service", "pay"],
    );
    eventually("the zone accepts the payments token", SYNC, || async {
        verify(&zone, &revoked, "payments", "pay-1", "pay")
            .await
            .ok()
    })
    .await;
    ok(g.weftctl(&["revoke", "dataplane-token", &revoked]));
    let e = eventually(
        "the zone refuses the revoked token",
        Duration::from_secs(15),
        || async {
            verify(&zone, &revoked, "payments", "pay-1", "pay")
                .await
                .err()
        },
    )
    .await;
    assert!(e.contains("was revoked"), "{e}");

    // With global gone, the zone keeps checking with what it last obtained.
    g.kill9();
    eventually("zone east disconnected", SYNC, || async {
        (zone.connected().await == Some(false)).then_some(())
    })
    .await;
    verify(&zone, &token, "default", "web-1", "web")
        .await
        .unwrap();
    assert!(
        verify(&zone, &revoked, "payments", "pay-1", "pay")
            .await
            .unwrap_err()
            .contains("was revoked")
    );
    assert!(
        verify(&zone, &token, "default", "web-1", "api")
            .await
            .is_err()
    );
}
