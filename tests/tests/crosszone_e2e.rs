//! Cross-zone traffic end to end: a real global, zones east and west, a real `weft-ingress`
//! per zone, backends in both zones and a frontend in east whose `weft-dp` serves DNS and
//! listens on the VIPs. Names are resolved with `dig`, requests made with `curl` and an HTTP
//! client; mTLS goes from sidecar to sidecar through the other zone's ingress.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_global::pg::testing::TestDb;
use weft_tests::dp::{App, Dataplane, Load};
use weft_tests::ingress::Ingress;
use weft_tests::{Backend, Global, Zone, client, eventually, free_port};

const SYNC: Duration = Duration::from_secs(30);

fn mtls_mesh() -> Value {
    json!({
        "type": "Mesh",
        "name": "default",
        "spec": {"mtls": {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]}},
    })
}

fn permission(name: &str, from: &str, action: &str) -> Value {
    let source = if from == "*" {
        json!({"kind": "Mesh"})
    } else {
        json!({"kind": "MeshService", "name": from})
    };
    json!({
        "type": "MeshTrafficPermission",
        "name": name,
        "mesh": "default",
        "spec": {"targetRef": {"kind": "Mesh"}, "from": [{"targetRef": source, "default": {"action": action}}]},
    })
}

/// Everything running; fields drop in order (proxies and ingresses before their zones).
struct World {
    fe: Dataplane,
    be_east: Dataplane,
    be_west: Dataplane,
    app_east: App,
    app_west: App,
    ing_east: Ingress,
    ing_west: Ingress,
    east: Zone,
    west: Zone,
    g: Global,
    _db: Option<TestDb>,
    /// The frontend proxy's DNS port.
    dns: u16,
}

async fn zone_with_ca(name: &str, g: &Global) -> Zone {
    let z = Zone::join(name, g, &[]).await.unwrap();
    z.wait_synced(SYNC).await;
    z.wait_mesh_ca("default", SYNC).await;
    z
}

async fn world(postgres: bool) -> World {
    let (db, g) = if postgres {
        let db = TestDb::create().await.unwrap();
        let g = Global::start(Backend::Postgres(db.url().to_string()))
            .await
            .unwrap();
        (Some(db), g)
    } else {
        (None, Global::start(Backend::Memory).await.unwrap())
    };
    g.api()
        .apply(&[mtls_mesh(), permission("allow-all", "*", "Allow")])
        .await
        .unwrap();
    let east = zone_with_ca("east", &g).await;
    let west = zone_with_ca("west", &g).await;
    let ing_east = Ingress::start(&g, &east, "ingress").await.unwrap();
    let ing_west = Ingress::start(&g, &west, "ingress").await.unwrap();
    let app_east = App::http("backend-east").await.unwrap();
    let app_west = App::http("backend-west").await.unwrap();
    let be_east = Dataplane::builder("backend-east", "backend")
        .inbound(app_east.port, "http")
        .start(&g, &east)
        .await
        .unwrap();
    let be_west = Dataplane::builder("backend-west", "backend")
        .inbound(app_west.port, "http")
        .start(&g, &west)
        .await
        .unwrap();
    let dns = free_port();
    let fe = Dataplane::builder("frontend", "frontend")
        .args(&["--dns-address", &format!("127.0.0.1:{dns}"), "--bind-vips"])
        .start(&g, &east)
        .await
        .unwrap();
    let w = World {
        fe,
        be_east,
        be_west,
        app_east,
        app_west,
        ing_east,
        ing_west,
        east,
        west,
        g,
        _db: db,
        dns,
    };
    // Both zones' backends are known in east (west's through global) before tests begin.
    for name in ["backend.mesh", "backend.east.mesh", "backend.west.mesh"] {
        w.vip(name).await;
    }
    w
}

/// What `dig` says: the status and the answers as (ttl, address).
#[derive(Debug)]
struct Dig {
    status: String,
    answers: Vec<(u32, String)>,
}

fn dig(port: u16, name: &str, qtype: &str) -> Dig {
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            name,
            qtype,
            "+tries=1",
            "+time=2",
            "+noall",
            "+comments",
            "+answer",
        ])
        .output()
        .expect("dig runs (install bind9-dnsutils; scripts/test.sh does)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_string();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5 && f[3] == qtype).then(|| (f[1].parse().unwrap_or(0), f[4].to_string()))
        })
        .collect();
    Dig { status, answers }
}

impl World {
    /// The VIP the frontend's DNS gives `name` (waits for it).
    async fn vip(&self, name: &str) -> String {
        let dns = self.dns;
        eventually(&format!("{name} resolves"), SYNC, || async move {
            let d = dig(dns, name, "A");
            (d.status == "NOERROR" && d.answers.len() == 1).then(|| d.answers[0].1.clone())
        })
        .await
    }

    fn east_port(&self) -> u16 {
        self.be_east.inbound.as_ref().unwrap().port
    }

    fn west_port(&self) -> u16 {
        self.be_west.inbound.as_ref().unwrap().port
    }
}

/// GET `http://vip:port/`: (status, body, the identity the backend saw).
async fn get(vip: &str, port: u16) -> Result<(u16, String, String), String> {
    let r = client()
        .get(format!("http://{vip}:{port}/"))
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
async fn dns_names_reach_the_other_zone_through_its_ingress_with_end_to_end_mtls() {
    let w = world(false).await;

    // DNS: three distinct VIPs from the VIP range, with a TTL; AAAA has no answer; an unknown
    // service is NXDOMAIN.
    let any = w.vip("backend.mesh").await;
    let pinned_west = w.vip("backend.west.mesh").await;
    let pinned_east = w.vip("backend.east.mesh").await;
    assert!(
        any != pinned_west && any != pinned_east && pinned_east != pinned_west,
        "{any} {pinned_west} {pinned_east}"
    );
    for vip in [&any, &pinned_west, &pinned_east] {
        let ip: std::net::Ipv4Addr = vip.parse().unwrap();
        assert_eq!(ip.octets()[0], 127, "{vip} is a loopback VIP");
        assert_eq!(ip.octets()[1] & 0xf0, 240, "{vip} is in 127.240.0.0/12");
    }
    let a = dig(w.dns, "BACKEND.WEST.MESH.", "A");
    assert_eq!(a.answers.len(), 1, "{a:?}");
    assert_eq!(a.answers[0].1, pinned_west);
    assert!(a.answers[0].0 > 0, "a TTL: {a:?}");
    let aaaa = dig(w.dns, "backend.mesh", "AAAA");
    assert_eq!(aaaa.status, "NOERROR", "{aaaa:?}");
    assert!(aaaa.answers.is_empty(), "{aaaa:?}");
    let none = dig(w.dns, "nosuch.mesh", "A");
    assert_eq!(none.status, "NXDOMAIN", "{none:?}");

    // `curl` to backend.west's VIP reaches west's backend, through west's ingress, and the
    // backend's sidecar saw the east frontend's certificate: TLS went end to end.
    let url = format!("http://{pinned_west}:{}/", w.west_port());
    let out = Command::new("curl")
        .args(["-sS", "-m", "10", "-D", "-", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "curl {url}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("backend-west"), "{text}");
    let seen = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-seen-xfcc:"))
        .unwrap_or("");
    assert!(
        seen.contains("spiffe://default/frontend"),
        "the west backend saw the frontend's SPIFFE ID: {text}"
    );
    assert_eq!(w.app_west.hits(), 1);
    assert_eq!(w.app_east.hits(), 0);
    let m = w.ing_west.metrics().await.unwrap();
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
            &w.ing_east.metrics().await.unwrap(),
            "weft_ingress_connections_total",
            &["service=\"backend\""]
        ),
        0.0,
        "east's ingress carried nothing"
    );
    // The ingress holds no key: nothing in its files or its /config could decrypt the stream.
    let cfg = w.ing_west.config().await.unwrap().to_string();
    assert!(!cfg.contains("PRIVATE KEY"), "{cfg}");
    for entry in std::fs::read_dir(w.ing_west.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let content = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            !content.contains("PRIVATE KEY"),
            "{} holds a key",
            path.display()
        );
    }

    // The pinned east name and the any-zone name go to east's backend.
    let (status, body, _) = get(&pinned_east, w.east_port()).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "backend-east"));
    for _ in 0..5 {
        let (status, body, _) = get(&any, w.east_port()).await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, "backend-east"),
            "local first"
        );
    }
    assert_eq!(w.app_west.hits(), 1);

    // A permission applied on global denying the frontend is enforced at west's backend.
    w.g.api()
        .apply(&[permission("deny-frontend", "frontend", "Deny")])
        .await
        .unwrap();
    let started = Instant::now();
    let west_port = w.west_port();
    let vip = pinned_west.clone();
    eventually("the deny reaches west's backend", SYNC, || {
        let vip = vip.clone();
        async move { matches!(get(&vip, west_port).await, Ok((403, _, _))).then_some(()) }
    })
    .await;
    eprintln!("deny enforced in west after {:?}", started.elapsed());
    let hits = w.app_west.hits();
    assert_eq!(get(&pinned_west, west_port).await.unwrap().0, 403);
    assert_eq!(
        w.app_west.hits(),
        hits,
        "a denied request never reaches the app"
    );
    w.g.api()
        .delete("/meshes/default/meshtrafficpermissions/deny-frontend")
        .await
        .unwrap();
    let vip = pinned_west.clone();
    eventually("allowed again", SYNC, || {
        let vip = vip.clone();
        async move { matches!(get(&vip, west_port).await, Ok((200, _, _))).then_some(()) }
    })
    .await;

    // Every zone sees both instances; the east zone shows its VIP.
    let s = w
        .east
        .api()
        .get("/_inspect/services")
        .await
        .unwrap()
        .unwrap();
    let backend = s["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["service"] == "backend")
        .unwrap_or_else(|| panic!("{s}"))
        .clone();
    assert_eq!(backend["instances"], 2, "{s}");
    assert_eq!(backend["vip"], any.as_str(), "{s}");
    let _ = (&w.be_east, &w.be_west, &w.west);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_mesh_fails_over_to_the_other_zone_and_comes_back() {
    let mut w = world(false).await;
    let any = w.vip("backend.mesh").await;
    let port = w.east_port();
    let load = Load::start(
        &format!("http://{any}:{port}/"),
        2,
        Duration::from_millis(10),
    );
    let app_east = w.app_east.hits.clone();
    eventually("load reaches east", SYNC, || {
        let h = app_east.clone();
        async move { (h.load(std::sync::atomic::Ordering::Relaxed) > 20).then_some(()) }
    })
    .await;
    assert_eq!(
        w.app_west.hits(),
        0,
        "local first: west gets nothing while east is healthy"
    );

    // East's backend (its sidecar) dies: requests fail over to west.
    w.be_east.kill9();
    let west_hits = w.app_west.hits.clone();
    eventually("load fails over to west", SYNC, || {
        let h = west_hits.clone();
        async move { (h.load(std::sync::atomic::Ordering::Relaxed) > 20).then_some(()) }
    })
    .await;
    // After the ejection window no request fails.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let failed = load.failed();
    let before = w.app_west.hits();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(w.app_west.hits() > before + 50, "west serves the load");
    assert_eq!(
        load.failed(),
        failed,
        "no client-visible error after the ejection window: {:?}",
        load.errors()
    );

    // East's backend comes back: traffic returns to east.
    w.be_east.restart().await.unwrap();
    let east_hits = w.app_east.hits.clone();
    let seen = east_hits.load(std::sync::atomic::Ordering::Relaxed);
    eventually("load returns to east", SYNC, || {
        let h = east_hits.clone();
        async move { (h.load(std::sync::atomic::Ordering::Relaxed) > seen + 20).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (west_before, east_before) = (w.app_west.hits(), w.app_east.hits());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        w.app_east.hits() > east_before + 50,
        "east serves the load again"
    );
    assert_eq!(
        w.app_west.hits(),
        west_before,
        "west gets nothing once east is back"
    );
    let (ok, failed) = load.finish().await;
    eprintln!("failover: {ok} ok, {failed} failed (all during the ejection window)");
    let _ = (&w.ing_east, &w.ing_west, &w.be_west, &w.fe);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vips_survive_zone_and_global_restarts() {
    let mut w = world(true).await;
    let names = ["backend.mesh", "backend.east.mesh", "backend.west.mesh"];
    let mut before = Vec::new();
    for n in names {
        before.push(w.vip(n).await);
    }
    let zone_vip = |s: &Value| -> Option<String> {
        s["items"]
            .as_array()?
            .iter()
            .find(|i| i["service"] == "backend")?["vip"]
            .as_str()
            .map(str::to_string)
    };
    let s = w
        .east
        .api()
        .get("/_inspect/services")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(zone_vip(&s).as_deref(), Some(before[0].as_str()), "{s}");

    // Zone east restarts (same data dir, empty memory store).
    w.east.kill9();
    w.east.restart().await.unwrap();
    w.east.wait_synced(SYNC).await;
    let east = &w.east;
    let vip_after = eventually("east knows backend again", SYNC, || async move {
        let s = east.api().get("/_inspect/services").await.ok()??;
        let item = s["items"]
            .as_array()?
            .iter()
            .find(|i| i["service"] == "backend")?
            .clone();
        (item["instances"] == 2).then(|| zone_vip(&s)).flatten()
    })
    .await;
    assert_eq!(vip_after, before[0], "the zone's VIP after its restart");
    // The frontend reconnects and gets the same table.
    let get_back = get(&before[2], w.west_port()).await;
    assert!(matches!(get_back, Ok((200, _, _))), "{get_back:?}");
    for (n, v) in names.iter().zip(&before) {
        assert_eq!(&w.vip(n).await, v, "{n} after the zone restart");
    }

    // Global restarts (Postgres keeps the resources); the zones reconnect.
    w.g.kill9();
    w.g.restart().await.unwrap();
    w.east.wait_synced(SYNC).await;
    w.west.wait_synced(SYNC).await;
    let s = w
        .east
        .api()
        .get("/_inspect/services")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(zone_vip(&s).as_deref(), Some(before[0].as_str()), "{s}");
    for (n, v) in names.iter().zip(&before) {
        assert_eq!(&w.vip(n).await, v, "{n} after the global restart");
    }
    let (status, body, _) = get(&before[2], w.west_port()).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "backend-west"));
    let _ = (
        &w.ing_east,
        &w.ing_west,
        &w.be_east,
        &w.be_west,
        &w.fe,
        &w.app_east,
    );
}
