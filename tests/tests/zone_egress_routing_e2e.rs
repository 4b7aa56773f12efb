//! `Mesh.spec.routing.zoneEgress: true` end to end: a real global, zones east and west with a
//! `weft-ingress` each, a `weft-ingress --mode egress` in east, a backend in west and a
//! frontend in east whose outbound names `backend`. East's proxies reach west only through
//! east's egress, which passes the mTLS through, unopened, to west's ingress; west's backend
//! sees the frontend's SPIFFE ID. Without the egress the frontend has no endpoint in west.

use std::time::Duration;

use serde_json::{Value, json};
use weft_tests::dp::{App, Dataplane};
use weft_tests::ingress::Ingress;
use weft_tests::{Backend, Global, Zone, client, egress, eventually, free_port};

const SYNC: Duration = Duration::from_secs(30);

fn zone_egress_mesh() -> Value {
    json!({
        "type": "Mesh",
        "name": "default",
        "spec": {"mtls": {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]},
                 "routing": {"zoneEgress": true}},
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

async fn zone_with_ca(name: &str, g: &Global) -> Zone {
    let z = Zone::join(name, g, &[]).await.unwrap();
    z.wait_synced(SYNC).await;
    z.wait_mesh_ca("default", SYNC).await;
    z
}

/// `GET url`: (status, body, the client identity the backend saw), or the error.
async fn get(url: &str) -> Result<(u16, String, String), String> {
    let r = client()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = r.status().as_u16();
    let xfcc = r
        .headers()
        .get("x-seen-xfcc")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Ok((status, r.text().await.map_err(|e| e.to_string())?, xfcc))
}

/// The sum of the series of `name` whose labels contain every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_zone_traffic_leaves_through_the_egress_with_end_to_end_mtls() {
    let g = Global::start(Backend::Memory).await.unwrap();
    g.api()
        .apply(&[zone_egress_mesh(), allow_all()])
        .await
        .unwrap();
    let east = zone_with_ca("east", &g).await;
    let west = zone_with_ca("west", &g).await;
    let ing_east = Ingress::start(&g, &east, "ingress").await.unwrap();
    let ing_west = Ingress::start(&g, &west, "ingress").await.unwrap();
    let app_west = App::http("backend-west").await.unwrap();
    let _be_west = Dataplane::builder("backend-west", "backend")
        .inbound(app_west.port, "http")
        .start(&g, &west)
        .await
        .unwrap();
    let port = free_port();
    let fe = Dataplane::builder("frontend", "frontend")
        .outbound(port, "backend")
        .start(&g, &east)
        .await
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/");

    // No egress in east: the mesh requires one, so west is out of reach (not even through
    // west's ingress). Wait until east knows west's backend and west's ingress, with which
    // any other mesh's proxy would have west's ingress as endpoint.
    eventually("east knows west's backend", SYNC, || async {
        let s = east.api().get("/_inspect/services").await.ok()??;
        s.to_string().contains("backend").then_some(())
    })
    .await;
    eventually("east knows west's ingress", SYNC, || async {
        let s = east.api().get("/zoneingresses").await.ok()??;
        s.to_string().contains("\"west\"").then_some(())
    })
    .await;
    let ingress_west = ing_west.address().to_string();
    for _ in 0..3 {
        let eps = fe.endpoints("backend").await.unwrap();
        assert!(
            eps.is_empty(),
            "no egress: no endpoint, and never west's ingress {ingress_west}: {eps:?}"
        );
        let (status, _, _) = get(&url).await.unwrap();
        assert_eq!(status, 503, "no egress: no endpoint");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(app_west.hits(), 0);

    // The egress arrives: it becomes the frontend's endpoint of backend.
    let eg = egress::start(&g, &east, "egress", &east.dataplane_ca_file())
        .await
        .unwrap();
    let want = vec![eg.address().to_string()];
    eventually(
        "the frontend's endpoint of backend is east's egress",
        SYNC,
        || async { (fe.endpoints("backend").await.ok()? == want).then_some(()) },
    )
    .await;
    let c = fe.config().await.unwrap();
    let ep = &c["services"]["backend"]["endpoints"][0];
    // Zone west: the frontend sends west's SNI and verifies the server as the backend (no
    // server identity of the egress), which the request below proves end to end.
    assert_eq!(ep["zone"], "west", "the endpoint is for zone west: {ep}");
    eventually(
        "the egress has the route to west's ingress",
        SYNC,
        || async {
            let c = eg.config().await.ok()?;
            c.to_string()
                .contains(&ing_west.address().port().to_string())
                .then_some(())
        },
    )
    .await;

    let (status, body, xfcc) = eventually("backend through the egress", SYNC, || async {
        get(&url).await.ok().filter(|(s, _, _)| *s == 200)
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "backend-west"));
    assert!(
        xfcc.contains("spiffe://default/frontend"),
        "west's backend saw the frontend's SPIFFE ID: {xfcc:?}"
    );
    assert!(app_west.hits() >= 1);

    let m = eg.metrics().await.unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_egress_passthrough_connections_total",
            &["mesh=\"default\"", "service=\"backend\"", "zone=\"west\""]
        ) >= 1.0,
        "east's egress passed the connection through:\n{m}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "weft_egress_connections_total",
            &["service=\"backend\""]
        ),
        0.0,
        "the egress terminated nothing:\n{m}"
    );
    let m = ing_west.metrics().await.unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_ingress_connections_total",
            &["service=\"backend\""]
        ) >= 1.0,
        "west's ingress carried the connection:\n{m}"
    );
    assert_eq!(
        metric_sum(
            &ing_east.metrics().await.unwrap(),
            "weft_ingress_connections_total",
            &["service=\"backend\""]
        ),
        0.0
    );
    // The egress holds no key of west's backend: its /config names certificates only.
    assert!(
        !eg.config()
            .await
            .unwrap()
            .to_string()
            .contains("PRIVATE KEY")
    );
}
