//! Benchmark: KDS propagation with weft-global on PostgreSQL (a real process) and 5 zones.
//!
//! - propagation: time from a policy write on global (HTTP PUT returns: committed) to its
//!   presence in all 5 zone stores, p50/p99/max over N writes, one write at a time;
//! - the floor, measured in the same run: the same write's PostgreSQL NOTIFY reaching a
//!   second connection (what any replica-to-replica propagation costs at least);
//! - fresh sync: time for a new zone to hold 10,000 policies (connect to `synced`);
//! - zone memory: RSS of a real `weft-zone` process holding 10,000 synced resources.
//!
//! The 5 zones run in this process (the `weft-zone` KDS client on memory stores) so the
//! moment a change lands is observed exactly, from the stores' watch channels.
//!
//! Usage: `cargo build --release --bins && target/release/bench-kds [WRITES] [POLICIES]`
//! (needs PostgreSQL: `bash .ci/postgres.sh`). Prints a table, writes target/bench-kds.json.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_core::store::{Memory, Store};
use weft_core::{Key, Kind};
use weft_global::pg::testing::TestDb;
use weft_tests::{Backend, Global, bin, free_port};

const ZONES: usize = 5;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn zone_token(g: &Global, zone: &str) -> anyhow::Result<PathBuf> {
    let r = g
        .req(Method::POST, "/_tokens/zone")
        .json(&json!({"zone": zone, "scope": "zone", "validFor": "24h"}))
        .send()
        .await?;
    let body: Value = r.json().await?;
    let token = body["token"]
        .as_str()
        .with_context(|| format!("no token in {body}"))?;
    let path = g.data_dir.path().join(format!("{zone}.token"));
    std::fs::write(&path, token)?;
    Ok(path)
}

/// An in-process zone: the real KDS client on a memory store we can watch.
async fn zone(
    g: &Global,
    name: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<dyn Store>, Arc<weft_zone::kds::Status>)> {
    let store: Arc<dyn Store> = Arc::new(Memory::new());
    let cfg = weft_zone::kds::Config {
        zone: name.to_string(),
        global_addresses: vec![format!("127.0.0.1:{}", g.kds_port)],
        token_file: zone_token(g, name).await?,
        trust: weft_zone::kds::Trust::CaFile(g.data_dir.path().join("kds-ca.pem")),
        liveness: Default::default(),
    };
    let client = weft_zone::kds::Client::new(cfg, store.clone(), name.to_string());
    let status = client.status();
    tokio::spawn(client.run(shutdown.child_token()));
    Ok((store, status))
}

async fn wait_synced(status: &weft_zone::kds::Status, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !status.to_zone.snapshot().synced {
        if Instant::now() > deadline {
            bail!("zone did not sync within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Wait until `store` holds the timeout `name` with `secs` as its connection timeout.
async fn wait_for(store: &dyn Store, name: &str, secs: u64) {
    let key = Key::new(Kind::MeshTimeout, Some("default"), name);
    let want = json!(format!("{secs}s"));
    let mut watch = store.watch();
    loop {
        if let Ok(Some(r)) = store.get(&key).await
            && r.spec["to"][0]["default"]["connectionTimeout"] == want
        {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), watch.changed()).await;
    }
}

fn policy(name: &str, secs: u64) -> Value {
    json!({"type": "MeshTimeout", "name": name, "mesh": "default",
           "spec": {"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "Mesh"}, "default": {"connectionTimeout": format!("{secs}s")}}]}})
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let writes: usize = args.get(1).map_or(Ok(1000), |s| s.parse())?;
    let policies: usize = args.get(2).map_or(Ok(10_000), |s| s.parse())?;
    let db = TestDb::create().await?;
    let g = Global::start(Backend::Postgres(db.url().to_string())).await?;
    let shutdown = CancellationToken::new();

    // Floor: a NOTIFY from the write's transaction reaching a listener on another connection.
    let mut listener = sqlx_listener(db.url()).await?;

    let mut zones = Vec::new();
    for i in 0..ZONES {
        zones.push(zone(&g, &format!("zone-{i}"), &shutdown).await?);
    }
    for (_, status) in &zones {
        wait_synced(status, Duration::from_secs(30)).await?;
    }
    eprintln!("{ZONES} zones synced; {writes} writes...");
    let mut propagation = Vec::with_capacity(writes);
    let mut floor = Vec::with_capacity(writes);
    let http = weft_tests::client();
    for i in 0..writes {
        let name = format!("p{}", i % 50);
        let secs = 1 + (i as u64 % 9) + 10 * (i as u64 / 50 % 5);
        let t0 = Instant::now();
        let notified = listener.next_after(t0);
        let r = http
            .put(format!("{}/meshes/default/meshtimeouts/{name}", g.url()))
            .bearer_auth(&g.admin_token)
            .json(&policy(&name, secs))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("write failed: {}", r.text().await?);
        }
        let waits = zones.iter().map(|(s, _)| wait_for(&**s, &name, secs));
        let (_, floor_at) = tokio::join!(futures_join_all(waits), notified);
        propagation.push(t0.elapsed().as_secs_f64() * 1e3);
        floor.push(floor_at?.duration_since(t0).as_secs_f64() * 1e3);
    }
    propagation.sort_by(f64::total_cmp);
    floor.sort_by(f64::total_cmp);

    // Fresh sync of `policies` policies.
    let docs: Vec<Value> = (0..policies)
        .map(|i| policy(&format!("bulk-{i}"), 1 + i as u64 % 9))
        .collect();
    for chunk in docs.chunks(2000) {
        let r = g.req(Method::POST, "/_apply").json(&chunk).send().await?;
        if !r.status().is_success() {
            bail!("bulk apply failed: {}", r.text().await?);
        }
    }
    let mut fresh = Vec::new();
    for run in 0..3 {
        let t0 = Instant::now();
        let (store, status) = zone(&g, &format!("fresh-{run}"), &shutdown).await?;
        wait_synced(&status, Duration::from_secs(120)).await?;
        fresh.push(t0.elapsed().as_secs_f64());
        let held = store
            .counts()
            .await?
            .iter()
            .filter(|c| c.kind == Kind::MeshTimeout)
            .map(|c| c.count)
            .sum::<u64>();
        if held < policies as u64 {
            bail!("fresh zone holds {held} policies, expected at least {policies}");
        }
    }
    fresh.sort_by(f64::total_cmp);

    // Memory of a real zone process holding them.
    let dir = tempfile::tempdir()?;
    let token = zone_token(&g, "mem").await?;
    let api_port = free_port();
    let mut child = std::process::Command::new(bin("weft-zone"))
        .args([
            "run",
            "--zone",
            "mem",
            "--global-address",
            &format!("127.0.0.1:{}", g.kds_port),
        ])
        .arg("--zone-token-file")
        .arg(&token)
        .arg("--global-ca-file")
        .arg(g.data_dir.path().join("kds-ca.pem"))
        .args(["--api-address", &format!("127.0.0.1:{api_port}")])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = http
            .get(format!("http://127.0.0.1:{api_port}/metrics"))
            .send()
            .await
            .ok();
        let text = match m {
            Some(r) => r.text().await.unwrap_or_default(),
            None => String::new(),
        };
        if text.contains("weft_kds_synced{direction=\"global_to_zone\"} 1") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the zone process did not sync");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let synced_resources = policies + 50 + 1;
    let rss = rss_kib(child.id())?;
    let _ = child.kill();
    let _ = child.wait();
    shutdown.cancel();

    println!(
        "\nKDS: 1 weft-global on PostgreSQL, {ZONES} zones, {writes} sequential policy writes"
    );
    println!("{:<44} {:>9} {:>9} {:>9}", "measure", "p50", "p99", "max");
    println!(
        "{:<44} {:>7.2}ms {:>7.2}ms {:>7.2}ms",
        "write on global -> present in all 5 zones",
        percentile(&propagation, 0.5),
        percentile(&propagation, 0.99),
        propagation[propagation.len() - 1]
    );
    println!(
        "{:<44} {:>7.2}ms {:>7.2}ms {:>7.2}ms",
        "floor: same write's NOTIFY at a listener",
        percentile(&floor, 0.5),
        percentile(&floor, 0.99),
        floor[floor.len() - 1]
    );
    println!(
        "{:<44} {:>8.3}s {:>9} {:>8.3}s",
        format!("fresh zone sync of {policies} policies (3 runs)"),
        percentile(&fresh, 0.5),
        "",
        fresh[fresh.len() - 1]
    );
    println!(
        "{:<44} {:>7.1}MiB",
        format!("weft-zone RSS holding ~{synced_resources} resources"),
        rss as f64 / 1024.0
    );
    let p99 = percentile(&propagation, 0.99);
    println!(
        "\ngoals: p99 propagation < 100 ms: {} ({p99:.2} ms); fresh sync of {policies} < 1 s: {} ({:.3} s)",
        if p99 < 100.0 { "met" } else { "NOT met" },
        if fresh[1] < 1.0 { "met" } else { "NOT met" },
        fresh[1]
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench-kds.json");
    std::fs::write(
        path,
        serde_json::to_string_pretty(&json!({
            "zones": ZONES, "writes": writes, "policies": policies,
            "propagation_ms": {"p50": percentile(&propagation, 0.5), "p99": p99, "max": propagation[propagation.len() - 1]},
            "floor_notify_ms": {"p50": percentile(&floor, 0.5), "p99": percentile(&floor, 0.99)},
            "fresh_sync_s": fresh, "zone_rss_kib": rss,
        }))?,
    )?;
    eprintln!("wrote {path}");
    Ok(())
}

async fn futures_join_all<F: std::future::Future<Output = ()>>(fs: impl Iterator<Item = F>) {
    for f in fs.collect::<Vec<_>>() {
        f.await;
    }
}

/// A LISTEN connection on the store's change channel.
struct Listener {
    inner: sqlx::postgres::PgListener,
}

async fn sqlx_listener(url: &str) -> anyhow::Result<Listener> {
    let mut inner = sqlx::postgres::PgListener::connect(url).await?;
    inner.listen("weft_changes").await?;
    Ok(Listener { inner })
}

impl Listener {
    /// The instant of the next notification (any received before `after` are skipped).
    fn next_after(
        &mut self,
        after: Instant,
    ) -> impl std::future::Future<Output = anyhow::Result<Instant>> + '_ {
        async move {
            loop {
                self.inner.recv().await?;
                let now = Instant::now();
                if now >= after {
                    return Ok(now);
                }
            }
        }
    }
}
