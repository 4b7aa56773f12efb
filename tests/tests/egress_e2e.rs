//! Zone egress end to end: a real global and zone, a real `weft-ingress --mode egress`, a
//! client `weft-dp` whose outbound names a MeshExternalService, and a plain HTTP server the
//! test starts as the external host. The client's proxy originates mTLS to the egress
//! (verified as `spiffe://default/zone-egress.east`), the egress checks the client's
//! permission and opens its own connection to the external host.

use std::time::Duration;

use serde_json::{Value, json};
use weft_tests::dp::Dataplane;
use weft_tests::egress::{self, ExternalHost};
use weft_tests::{Backend, Global, Zone, client, eventually, free_port};

const SYNC: Duration = Duration::from_secs(30);

fn mtls_mesh() -> Value {
    json!({
        "type": "Mesh",
        "name": "default",
        "spec": {"mtls": {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]}},
    })
}

fn allow_all() -> Value {
    json!({
        "type": "MeshTrafficPermission",
        "name": "allow-all",
        "mesh": "default",
        "spec": {"targetRef": {"kind": "Mesh"},
                 "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]},
    })
}

/// The permission of service `from` for external service `external`.
fn external_permission(external: &str, from: &str, action: &str) -> Value {
    json!({
        "type": "MeshTrafficPermission",
        "name": format!("{external}-{from}"),
        "mesh": "default",
        "spec": {"targetRef": {"kind": "MeshExternalService", "name": external},
                 "from": [{"targetRef": {"kind": "MeshService", "name": from},
                           "default": {"action": action}}]},
    })
}

fn external_service(name: &str, port: u16) -> Value {
    json!({
        "type": "MeshExternalService",
        "name": name,
        "mesh": "default",
        "spec": {"match": {"type": "HostnameGenerator", "port": 80, "protocol": "http"},
                 "endpoints": [{"address": "127.0.0.1", "port": port}]},
    })
}

async fn zone_with_ca(name: &str, g: &Global) -> Zone {
    let z = Zone::join(name, g, &[]).await.unwrap();
    z.wait_synced(SYNC).await;
    z.wait_mesh_ca("default", SYNC).await;
    z
}

/// `GET url`: (status, body), or the error.
async fn get(url: &str) -> Result<(u16, String), String> {
    let r = client()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.unwrap_or_default()))
}

#[tokio::test]
async fn external_service_through_the_egress_with_permissions() {
    let g = Global::start(Backend::Memory).await.unwrap();
    let external = ExternalHost::http("external-host").await.unwrap();
    g.api()
        .apply(&[
            mtls_mesh(),
            allow_all(),
            external_service("httpbin", external.port),
        ])
        .await
        .unwrap();
    let east = zone_with_ca("east", &g).await;
    let port = free_port();
    let web = Dataplane::builder("web", "web")
        .outbound(port, "httpbin")
        .start(&g, &east)
        .await
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/status");

    // No egress in the zone: the external service has no endpoint.
    assert_eq!(
        web.endpoints("httpbin").await.unwrap(),
        Vec::<String>::new()
    );
    let (status, _) = get(&url).await.unwrap();
    assert_eq!(status, 503, "no egress: no endpoint");
    assert_eq!(external.hits(), 0);

    // Any PEM CA does for --external-ca-file: this external host speaks plain HTTP.
    let eg = egress::start(&g, &east, "egress", &east.dataplane_ca_file())
        .await
        .unwrap();
    let want = vec![eg.address().to_string()];
    eventually(
        "the client's endpoints of httpbin are the egress",
        SYNC,
        || async { (web.endpoints("httpbin").await.ok()? == want).then_some(()) },
    )
    .await;
    eventually(
        "the egress has its certificate for mesh default",
        SYNC,
        || async {
            let c = eg.config().await.ok()?;
            let certs = c["certificates"].as_array()?;
            certs
                .iter()
                .any(|c| {
                    c["mesh"] == "default" && c["identity"] == "spiffe://default/zone-egress.east"
                })
                .then_some(())
        },
    )
    .await;

    // Allowed: through the client's outbound, the egress, to the external host.
    let body = eventually("httpbin answers through the egress", SYNC, || async {
        match get(&url).await {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    })
    .await;
    assert_eq!(body, "external-host");
    assert!(external.hits() >= 1);
    let connections = "weft_egress_connections_total{mesh=\"default\",service=\"httpbin\"}";
    assert!(
        eg.metric(connections).await.unwrap_or(0.0) >= 1.0,
        "{}",
        eg.metrics().await.unwrap()
    );
    let rx = "weft_egress_bytes_total{mesh=\"default\",service=\"httpbin\",direction=\"rx\"}";
    assert!(eg.metric(rx).await.unwrap_or(0.0) > 0.0);

    // Denied on global for web: the egress refuses (a 403 for an http service), the
    // external host sees nothing more; the pooled connection is cut at the change.
    g.api()
        .apply(&[external_permission("httpbin", "web", "Deny")])
        .await
        .unwrap();
    let body = eventually("the egress denies web", SYNC, || async {
        match get(&url).await {
            Ok((403, body)) => Some(body),
            _ => None,
        }
    })
    .await;
    assert!(
        body.contains("spiffe://default/web may not use httpbin"),
        "{body}"
    );
    let hits = external.hits();
    for _ in 0..3 {
        let (status, _) = get(&url).await.unwrap();
        assert_eq!(status, 403);
    }
    assert_eq!(
        external.hits(),
        hits,
        "a denied request never reaches the host"
    );
    assert!(
        eg.metric("weft_egress_refused_total{reason=\"denied\"}")
            .await
            .unwrap_or(0.0)
            >= 3.0
    );

    // Allowed again: it works again.
    g.api()
        .apply(&[external_permission("httpbin", "web", "Allow")])
        .await
        .unwrap();
    eventually("httpbin answers again", SYNC, || async {
        matches!(get(&url).await, Ok((200, _))).then_some(())
    })
    .await;
    assert!(external.hits() > hits);

    // The egress gone: its ZoneEgress is removed and the client loses the endpoint.
    drop(eg);
    eventually(
        "the client's endpoints of httpbin are empty again",
        SYNC,
        || async {
            web.endpoints("httpbin")
                .await
                .ok()?
                .is_empty()
                .then_some(())
        },
    )
    .await;
}
