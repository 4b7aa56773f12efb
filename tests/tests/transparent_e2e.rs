//! Transparent mode end to end: the frontend application and its `weft-dp` live in a network
//! namespace of their own; the proxy serves DNS on the namespace's 127.0.0.1:53 (its
//! resolv.conf) and takes, on its transparent outbound port, the connections iptables
//! redirects from the mesh's VIPs (the rules `weft-dp transparent-rules` prints). Global, the
//! zone, the backend app and its sidecar run on the host, reached over a veth pair. The
//! application is `curl http://backend.mesh/` with no proxy settings.
//! Needs root (CI runs as root), iproute2, iptables, curl and dig (scripts/test.sh).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use weft_tests::dp::App;
use weft_tests::netns::{Netns, Relay, is_root};
use weft_tests::{Global, Proc, Zone, bin, client, eventually, free_port, ok};

const SYNC: Duration = Duration::from_secs(30);
/// The frontend proxy's transparent outbound port.
const TRANSPARENT_PORT: u16 = 15001;

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
        "spec": {"targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]},
    })
}

/// A `weft-dp` started from a Dataplane document, on the host or inside `netns`.
struct Sidecar {
    /// First: the log is printed on drop, before the dir holding it is removed.
    _proc: Proc,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Issue a token on `g`, start `weft-dp run` with `yaml` against `zone_address`, wait for
    /// `/ready` on `admin`.
    async fn start(
        g: &Global,
        zone: &Zone,
        zone_address: &str,
        (name, service, yaml): (&str, &str, &str),
        admin: SocketAddr,
        netns: Option<&Netns>,
        extra: &[&str],
    ) -> anyhow::Result<Sidecar> {
        let dir = tempfile::tempdir()?;
        let token = ok(g.weftctl(&[
            "generate",
            "dataplane-token",
            "--mesh",
            "default",
            "--name",
            name,
            "--service",
            service,
            "--valid-for",
            "24h",
        ]));
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token.trim())?;
        let dp_file = dir.path().join("dataplane.yaml");
        std::fs::write(&dp_file, yaml)?;
        let mut cmd = match netns {
            Some(ns) => ns.command(bin("weft-dp")),
            None => Command::new(bin("weft-dp")),
        };
        cmd.arg("run")
            .args(["--zone-address", &format!("https://{zone_address}")])
            .arg("--zone-ca-file")
            .arg(zone.dataplane_ca_file())
            .arg("--dataplane-file")
            .arg(&dp_file)
            .arg("--token-file")
            .arg(&token_file)
            .args(["--admin-address", &admin.to_string()])
            .args(extra);
        let mut proc = Proc::new(format!("weft-dp {name}"), dir.path().join("dp.log"));
        proc.spawn(cmd)?;
        let http = client();
        let deadline = Instant::now() + SYNC;
        loop {
            if let Some(status) = proc.exited()? {
                bail!("weft-dp {name} exited with {status}:\n{}", proc.logs());
            }
            if let Ok(r) = http.get(format!("http://{admin}/ready")).send().await
                && r.status().is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("weft-dp {name} not ready after {SYNC:?}:\n{}", proc.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Sidecar {
            _proc: proc,
            admin,
            _dir: dir,
        })
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }
}

fn dataplane(name: &str, service: &str, address: &str, port: u16, app_port: u16) -> String {
    format!(
        "type: Dataplane\nname: {name}\nmesh: default\nspec:\n  networking:\n    address: {address}\n    inbound:\n    - port: {port}\n      servicePort: {app_port}\n      protocol: http\n      tags:\n        weft.io/service: {service}\n"
    )
}

/// `curl -i URL` inside the namespace: (status, the `x-seen-xfcc` header, body).
fn curl(ns: &Netns, url: &str) -> anyhow::Result<(u16, String, String)> {
    let out = ns
        .command("curl")
        .args(["-sS", "-i", "--max-time", "10", url])
        .output()
        .context("running curl (install curl)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "curl {url}: {}: {}{text}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let xfcc = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-seen-xfcc")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Ok((status, xfcc, body.to_string()))
}

/// The sum of the series of `name` whose labels contain every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_in_a_namespace_calls_backend_mesh_with_no_proxy_settings() {
    assert!(
        is_root(),
        "this test needs root: it creates a network namespace, a veth pair and iptables rules (run it as root, as CI does)"
    );
    let ns = Netns::create("nameserver 127.0.0.1\n").unwrap();
    let host = ns.host_ip.to_string();

    let g = Global::start(weft_tests::Backend::Memory).await.unwrap();
    g.api().apply(&[mtls_mesh(), allow_all()]).await.unwrap();
    // The frontend reaches the zone's data-plane API at the host's veth address (a relay to
    // its loopback listener), so the zone's certificate must name that address too.
    let zone = Zone::join("east", &g, &["--dataplane-san", &host])
        .await
        .unwrap();
    zone.wait_synced(SYNC).await;
    zone.wait_mesh_ca("default", SYNC).await;
    let relay = Relay::start(
        SocketAddr::new(ns.host_ip.into(), 0),
        zone.dataplane_address().parse().unwrap(),
    )
    .await
    .unwrap();

    // The backend: its sidecar's inbound on the host's veth address, port 80, so that the
    // service's port (and the VIP's) is 80.
    let app = App::http("backend-1").await.unwrap();
    let backend = Sidecar::start(
        &g,
        &zone,
        &zone.dataplane_address(),
        (
            "backend-1",
            "backend",
            &dataplane("backend-1", "backend", &host, 80, app.port),
        ),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        None,
        &[],
    )
    .await
    .unwrap();

    // The frontend, inside the namespace: DNS on the namespace's 127.0.0.1:53 (names outside
    // .mesh go to the host side, where nothing answers), the transparent outbound, and the
    // admin endpoint on the namespace's veth address so that the test can read it.
    let frontend = Sidecar::start(
        &g,
        &zone,
        &relay.address.to_string(),
        (
            "frontend-1",
            "frontend",
            &dataplane("frontend-1", "frontend", &ns.ns_ip.to_string(), 8080, 18080),
        ),
        SocketAddr::new(ns.ns_ip.into(), 9901),
        Some(&ns),
        &[
            "--dns-address",
            "127.0.0.1:53",
            "--dns-upstream",
            &format!("{host}:53"),
            "--transparent-outbound-port",
            &TRANSPARENT_PORT.to_string(),
        ],
    )
    .await
    .unwrap();

    // The rules, as weft-dp prints them, applied in the namespace.
    let rules = ok(Command::new(bin("weft-dp"))
        .args([
            "transparent-rules",
            "--outbound-port",
            &TRANSPARENT_PORT.to_string(),
        ])
        .output()
        .unwrap());
    assert!(rules.contains("-d 127.240.0.0/12"), "{rules}");
    for line in rules.lines() {
        ns.sh(line).unwrap();
    }

    // The name resolves through the proxy's DNS (the namespace's resolv.conf) to a VIP.
    let vip = eventually("backend.mesh resolves in the namespace", SYNC, || async {
        let out = ns.sh("dig +short +tries=1 +time=2 backend.mesh A").ok()?;
        let vip = out.trim().to_string();
        vip.starts_with("127.").then_some(vip)
    })
    .await;
    let ip: std::net::Ipv4Addr = vip.parse().unwrap();
    assert_eq!(ip.octets()[1] & 0xf0, 240, "{vip} is in 127.240.0.0/12");

    // The application: plain curl, no proxy settings, to the name.
    let (status, xfcc, body) = eventually("curl http://backend.mesh/ answers", SYNC, || async {
        curl(&ns, "http://backend.mesh/")
            .ok()
            .filter(|r| r.0 == 200)
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "backend-1"));
    assert!(
        xfcc.contains("spiffe://default/frontend"),
        "the backend saw the frontend's identity: {xfcc:?}"
    );
    let hits = app.hits();
    for _ in 0..3 {
        let (status, _, body) = curl(&ns, "http://backend.mesh/").unwrap();
        assert_eq!((status, body.as_str()), (200, "backend-1"));
    }
    assert_eq!(app.hits(), hits + 3, "every request reached the backend");

    let m = frontend.metrics().await.unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_dp_transparent_connections_total",
            &[r#"result="vip""#]
        ) >= 4.0,
        "{m}"
    );
    assert!(
        metric_sum(
            &m,
            "weft_dp_requests_total",
            &[
                r#"direction="outbound""#,
                r#"service="backend""#,
                r#"code_class="2xx""#
            ]
        ) >= 4.0,
        "{m}"
    );
    let bm = backend.metrics().await.unwrap();
    assert!(
        metric_sum(
            &bm,
            "weft_dp_requests_total",
            &[r#"direction="inbound""#, r#"service="backend""#]
        ) >= 4.0,
        "{bm}"
    );

    // A port the VIP does not serve: redirected, closed at once, counted.
    let err = curl(&ns, &format!("http://{vip}:81/"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reset") || err.contains("Empty reply") || err.contains("closed"),
        "{err}"
    );
    let m = frontend.metrics().await.unwrap();
    assert_eq!(
        metric_sum(
            &m,
            "weft_dp_transparent_connections_total",
            &[r#"result="unknown""#]
        ),
        1.0,
        "{m}"
    );

    // A name outside .mesh is forwarded upstream; nothing answers there, so the proxy says
    // SERVFAIL (within its upstream timeout) instead of leaving the query hanging.
    let out = ns
        .sh("dig +tries=1 +time=6 example.com A | grep -o 'status: [A-Z]*' || true")
        .unwrap();
    assert_eq!(out.trim(), "status: SERVFAIL", "{out}");

    drop(frontend);
    drop(backend);
    drop(relay);
    drop(ns);
    let leftover = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&leftover.stdout)
            .contains(&format!("weft-t-{}", std::process::id())),
        "the namespace is removed on drop"
    );
}
