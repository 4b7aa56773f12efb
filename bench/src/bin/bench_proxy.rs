//! Benchmark (issues 4 and 5): what a sidecar pair, and a zone ingress between them, cost
//! against the same upstream on loopback.
//!
//! Chains, all set up once and measured alternately (run 1 of every chain, then run 2, ...):
//! - `D0`: load generator -> upstream;
//! - `floor`: -> bench-tunnel client -> (mTLS) -> bench-tunnel server -> upstream (minimal
//!   tokio-rustls pair: what any mTLS sidecar pair costs at least);
//! - `haproxy`: -> haproxy -> (mTLS) -> haproxy -> upstream (Debian's haproxy, nbthread 1);
//! - `D2`: -> weft-dp -> (mTLS) -> weft-dp -> upstream, configured by a real weft-global
//!   (memory store) and weft-zone;
//! - `D3`: -> weft-dp (zone-1) -> (mTLS, SNI `backend.zone-2.default.weft`) -> weft-ingress
//!   (zone-2) -> weft-dp (zone-2) -> upstream: the client's endpoint for `backend` is zone-2's
//!   ingress, as the zones compute it (zone-2's ZoneIngress and MeshService through global);
//! - `D3-haproxy`: the same with HAProxy (TCP mode, `req.ssl_sni` routing) as zone-3's ingress:
//!   a ZoneIngress with HAProxy's address registered in zone-3 over the data-plane API.
//!
//! Loads: fixed rates (coordinated-omission corrected: `oha -q R --latency-correction`) and
//! maximum throughput (fixed concurrency). Per measurement: latency percentiles and requests/s
//! from oha, CPU time (utime+stime, /proc/<pid>/stat) of each proxy process before and after,
//! and its VmRSS. Then the idle check: one weft-dp whose Dataplane has outbounds to N
//! services registered in the zone, its VmRSS once ready, beside the same proxy with no
//! outbound (the baseline).
//!
//! Usage: `scripts/bench-proxy.sh` (installs haproxy and oha, builds, runs), or
//! `target/release/bench-proxy --runs 1 --duration 2s` for a quick look.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use reqwest::Method;
use serde_json::{Value, json};
use weft_bench::{Proc, cpu_ticks, make_identities, rss_kib, sibling_bin, ticks_per_second};
use weft_tests::{Api, Backend, Global, free_port};

#[derive(Parser, Debug)]
#[command(
    name = "bench-proxy",
    about = "sidecar pair (issue 4) and zone ingress (issue 5) benchmark"
)]
struct Args {
    /// Runs per chain and load (alternating chains); 0 skips the measurements (only the idle
    /// check).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Length of each measurement (Go syntax: 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up at maximum throughput of each chain before run 1.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    warmup: Duration,
    /// Fixed request rates to measure, requests/s.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rates: Vec<u32>,
    /// Connections of the fixed-rate loads.
    #[arg(long, default_value_t = 16)]
    rate_connections: usize,
    /// Connections of the maximum-throughput load.
    #[arg(long, default_value_t = 32)]
    max_connections: usize,
    /// Chains to run (D0 always runs: the others are compared with it). `weft` is D2, `d3`
    /// is D3 and D3-haproxy (the HAProxy variant needs --haproxy).
    #[arg(long, value_delimiter = ',', default_value = "floor,haproxy,weft,d3")]
    chains: Vec<String>,
    /// The load generator.
    #[arg(long, default_value = "oha")]
    oha: PathBuf,
    #[arg(long, default_value = "haproxy")]
    haproxy: PathBuf,
    /// Services in the idle weft-dp's config (0: skip the idle check).
    #[arg(long, default_value_t = 1000)]
    idle_services: usize,
    /// Environment of the idle weft-dp processes, KEY=VALUE (repeatable), e.g.
    /// MALLOC_ARENA_MAX=1 to see what glibc's arenas cost.
    #[arg(long)]
    idle_env: Vec<String>,
    /// The weft-dp binary of D2, D3 and the idle check (default: the one next to this
    /// binary). `scripts/bench-proxy.sh` passes `target/sidecar/weft-dp`: weft-dp as shipped,
    /// built with the workspace's `sidecar` profile (`cargo build --profile sidecar -p weft-dp`).
    #[arg(long)]
    weft_dp: Option<PathBuf>,
    /// The weft-dp binary of the idle check (default: the D2 one), e.g. one built with
    /// another profile.
    #[arg(long)]
    idle_weft_dp: Option<PathBuf>,
    /// Also run `D2-alt`: the D2 pair with this weft-dp binary (e.g. another release
    /// profile), beside D2 in the same run. Its services are `server-alt`/`client-alt`.
    #[arg(long)]
    alt_weft_dp: Option<PathBuf>,
    /// Also write every sample as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the work directory (configs, certificates, logs) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<weft_core::validate::Duration>()
        .map(|d| d.as_std())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Load {
    Rate(u32),
    Max,
}

impl Load {
    fn label(self, args: &Args) -> String {
        match self {
            Load::Rate(r) => format!(
                "{r} req/s fixed rate, {} connections",
                args.rate_connections
            ),
            Load::Max => format!("max throughput, {} connections", args.max_connections),
        }
    }
}

/// One chain under test: the URL the load generator calls and the proxy processes to watch.
struct Chain {
    name: &'static str,
    url: String,
    /// (role, process): the proxies whose CPU and RSS are reported.
    proxies: Vec<(&'static str, Proc)>,
    /// Why the chain could not run, if it could not.
    unavailable: Option<String>,
}

impl Chain {
    fn down(name: &'static str, why: String) -> Chain {
        eprintln!("!! chain {name} unavailable: {why}");
        Chain {
            name,
            url: String::new(),
            proxies: Vec::new(),
            unavailable: Some(why),
        }
    }
}

/// One measurement.
#[derive(Clone, Debug)]
struct Sample {
    chain: &'static str,
    load: Load,
    run: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    rps: f64,
    requests: u64,
    errors: u64,
    /// role -> CPU µs per request.
    cpu_us: BTreeMap<&'static str, f64>,
    /// role -> VmRSS KiB after the measurement.
    rss_kib: BTreeMap<&'static str, u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if let Some(bin) = &args.weft_dp {
        WEFT_DP.set(bin.clone()).expect("set once");
    }
    let work = tempfile::Builder::new().prefix("bench-proxy-").tempdir()?;
    let dir = work.path().to_path_buf();
    eprintln!("work dir {}", dir.display());
    check_tool(&args.oha, "--version")?;

    // The upstream, shared by every chain.
    let up_port = free_port();
    let mut cmd = Command::new(sibling_bin("bench-upstream")?);
    cmd.arg(format!("127.0.0.1:{up_port}"));
    let upstream = Proc::spawn("bench-upstream", cmd, dir.join("upstream.log"))?;
    let up_url = format!("http://127.0.0.1:{up_port}/");
    wait_http(&up_url, Duration::from_secs(10))
        .await
        .context("upstream")?;

    let mut chains = vec![Chain {
        name: "D0",
        url: up_url.clone(),
        proxies: Vec::new(),
        unavailable: None,
    }];
    let ids = make_identities(&dir, &["client", "server"])?;
    let mut weft_env: Option<WeftEnv> = None;
    // Zones, sessions and processes D3 needs beyond its chains' proxies; dropped at the end.
    let mut d3_env = Vec::new();
    for name in args.chains.iter().filter(|n| !n.is_empty()) {
        if name == "d3" {
            if weft_env.is_none() {
                match WeftEnv::start(&dir).await {
                    Ok(env) => weft_env = Some(env),
                    Err(e) => {
                        let why = format!("control plane: {e:#}");
                        chains.push(Chain::down("D3", why.clone()));
                        chains.push(Chain::down("D3-haproxy", why));
                        continue;
                    }
                }
            }
            let env = weft_env.as_ref().expect("started above");
            chains.push(match env.d3_weft(&dir, up_port).await {
                Ok((c, keep)) => {
                    d3_env.push(keep);
                    c
                }
                Err(e) => Chain::down("D3", format!("{e:#}")),
            });
            chains.push(match env.d3_haproxy(&args, &dir, up_port).await {
                Ok((c, keep)) => {
                    d3_env.push(keep);
                    c
                }
                Err(e) => Chain::down("D3-haproxy", format!("{e:#}")),
            });
            continue;
        }
        let chain = match name.as_str() {
            "floor" => floor_chain(&dir, &ids, up_port)
                .await
                .unwrap_or_else(|e| Chain::down("floor", format!("{e:#}"))),
            "haproxy" => haproxy_chain(&args, &dir, &ids, up_port)
                .await
                .unwrap_or_else(|e| Chain::down("haproxy", format!("{e:#}"))),
            "weft" => {
                if weft_env.is_none() {
                    match WeftEnv::start(&dir).await {
                        Ok(env) => weft_env = Some(env),
                        Err(e) => {
                            chains.push(Chain::down("D2", format!("control plane: {e:#}")));
                            continue;
                        }
                    }
                }
                let env = weft_env.as_ref().expect("started above");
                chains.push(
                    env.pair(&dir, up_port)
                        .await
                        .unwrap_or_else(|e| Chain::down("D2", format!("{e:#}"))),
                );
                match &args.alt_weft_dp {
                    Some(alt) => env
                        .alt_pair(&dir, up_port, alt)
                        .await
                        .unwrap_or_else(|e| Chain::down("D2-alt", format!("{e:#}"))),
                    None => continue,
                }
            }
            other => bail!("unknown chain {other:?} (floor, haproxy, weft, d3)"),
        };
        chains.push(chain);
    }

    // Warm up every chain that runs.
    for c in chains
        .iter()
        .filter(|c| c.unavailable.is_none() && args.runs > 0)
    {
        eprintln!("warm-up {} ({:?})", c.name, args.warmup);
        if let Err(e) = oha(&args, Load::Max, args.warmup, &c.url).await {
            eprintln!("warm-up of {} failed: {e:#}", c.name);
        }
    }

    let mut loads: Vec<Load> = args.rates.iter().map(|r| Load::Rate(*r)).collect();
    loads.push(Load::Max);
    let mut samples = Vec::new();
    let started = Instant::now();
    for run in 1..=args.runs {
        for load in &loads {
            for c in chains.iter_mut() {
                if c.unavailable.is_some() {
                    continue;
                }
                match measure(&args, c, *load, run).await {
                    Ok(s) => {
                        eprintln!(
                            "run {run} {:<8} {:<40} p50 {:.3} ms p99 {:.3} ms {:.0} req/s cpu {:?} µs/req",
                            c.name,
                            load.label(&args),
                            s.p50_ms,
                            s.p99_ms,
                            s.rps,
                            s.cpu_us
                        );
                        samples.push(s);
                    }
                    Err(e) => {
                        eprintln!("!! run {run} {} {}: {e:#}", c.name, load.label(&args));
                        if let Some(why) = c
                            .proxies
                            .iter_mut()
                            .find_map(|(_, p)| p.check_alive().err())
                        {
                            c.unavailable = Some(format!("died during run {run}: {why:#}"));
                        }
                    }
                }
            }
        }
    }
    eprintln!("measurements took {:?}", started.elapsed());

    let idle = match args.idle_services {
        0 => None,
        n => {
            if weft_env.is_none() {
                match WeftEnv::start(&dir).await {
                    Ok(env) => weft_env = Some(env),
                    Err(e) => eprintln!("!! idle check: control plane: {e:#}"),
                }
            }
            Some(match &weft_env {
                Some(env) => env.idle(&args, &dir, n).await.map_err(|e| format!("{e:#}")),
                None => Err("the control plane did not start".to_string()),
            })
        }
    };

    let report = report(&args, &chains, &loads, &samples, idle.as_ref());
    println!("{report}");
    if let Some(path) = &args.json {
        let raw: Vec<Value> = samples
            .iter()
            .map(|s| {
                json!({"chain": s.chain, "load": format!("{:?}", s.load), "run": s.run,
                       "p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "p99_ms": s.p99_ms,
                       "rps": s.rps, "requests": s.requests, "errors": s.errors,
                       "cpu_us_per_req": s.cpu_us, "rss_kib": s.rss_kib})
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&raw)?)?;
    }
    drop(upstream);
    drop(chains);
    drop(d3_env);
    drop(weft_env);
    if args.keep {
        let kept = work.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(())
}

fn check_tool(path: &Path, arg: &str) -> anyhow::Result<()> {
    let out = Command::new(path)
        .arg(arg)
        .output()
        .with_context(|| format!("running {} {arg} (is it installed?)", path.display()))?;
    if !out.status.success() {
        bail!("{} {arg} failed: {}", path.display(), out.status);
    }
    Ok(())
}

/// Wait until `url` answers 200 with a 1 KiB body.
async fn wait_http(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + timeout;
    loop {
        let last;
        match http.get(url).send().await {
            Ok(r) if r.status().is_success() => {
                let body = r.bytes().await?;
                if body.len() == 1024 {
                    return Ok(());
                }
                last = format!("body of {} bytes", body.len());
            }
            Ok(r) => {
                last = format!(
                    "status {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )
            }
            Err(e) => last = format!("{e}"),
        }
        if Instant::now() > deadline {
            bail!("{url} not answering 200 with 1 KiB after {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Chains

async fn floor_chain(
    dir: &Path,
    ids: &[weft_bench::IdentityFiles],
    up_port: u16,
) -> anyhow::Result<Chain> {
    let (client, server) = (&ids[0], &ids[1]);
    let (c_port, s_port) = (free_port(), free_port());
    let tunnel = sibling_bin("bench-tunnel")?;
    let mut cmd = Command::new(&tunnel);
    cmd.arg("server")
        .arg("--listen")
        .arg(format!("127.0.0.1:{s_port}"))
        .arg("--connect")
        .arg(format!("127.0.0.1:{up_port}"))
        .arg("--cert")
        .arg(&server.chain)
        .arg("--key")
        .arg(&server.key)
        .arg("--ca")
        .arg(&server.root);
    let s = Proc::spawn("tunnel server", cmd, dir.join("tunnel-server.log"))?;
    let mut cmd = Command::new(&tunnel);
    cmd.arg("client")
        .arg("--listen")
        .arg(format!("127.0.0.1:{c_port}"))
        .arg("--connect")
        .arg(format!("127.0.0.1:{s_port}"))
        .arg("--cert")
        .arg(&client.chain)
        .arg("--key")
        .arg(&client.key)
        .arg("--ca")
        .arg(&client.root)
        .arg("--expect")
        .arg(format!("spiffe://{}/server", weft_bench::MESH));
    let c = Proc::spawn("tunnel client", cmd, dir.join("tunnel-client.log"))?;
    let url = format!("http://127.0.0.1:{c_port}/");
    let mut chain = Chain {
        name: "floor",
        url,
        proxies: vec![("client", c), ("server", s)],
        unavailable: None,
    };
    ready(&mut chain).await?;
    Ok(chain)
}

/// Wait for the chain to answer; on failure, the error carries the proxies' logs.
async fn ready(chain: &mut Chain) -> anyhow::Result<()> {
    ready_within(chain, Duration::from_secs(30)).await
}

async fn ready_within(chain: &mut Chain, timeout: Duration) -> anyhow::Result<()> {
    if let Err(e) = wait_http(&chain.url, timeout).await {
        let mut msg = format!("{e:#}");
        for (role, p) in chain.proxies.iter_mut() {
            let alive = p
                .check_alive()
                .err()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            let _ = write!(msg, "\n--- {role} {}{alive}:\n{}", p.name, p.log_tail(20));
        }
        bail!(msg);
    }
    Ok(())
}

async fn haproxy_chain(
    args: &Args,
    dir: &Path,
    ids: &[weft_bench::IdentityFiles],
    up_port: u16,
) -> anyhow::Result<Chain> {
    check_tool(&args.haproxy, "-v")?;
    let (client, server) = (&ids[0], &ids[1]);
    let (c_port, s_port) = (free_port(), free_port());
    let common = "global
    nbthread 1
    maxconn 4096
    ssl-server-verify required

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
";
    let client_cfg = format!(
        "{common}
frontend app_out
    bind 127.0.0.1:{c_port}
    default_backend mesh

backend mesh
    server server1 127.0.0.1:{s_port} ssl crt {crt} ca-file {ca} verify required ssl-min-ver TLSv1.3 alpn http/1.1
",
        crt = client.combined.display(),
        ca = client.root.display()
    );
    let server_cfg = format!(
        "{common}
frontend mesh_in
    bind 127.0.0.1:{s_port} ssl crt {crt} ca-file {ca} verify required ssl-min-ver TLSv1.3 alpn http/1.1
    default_backend app

backend app
    server app1 127.0.0.1:{up_port}
",
        crt = server.combined.display(),
        ca = server.root.display()
    );
    let mut procs = Vec::new();
    for (role, cfg) in [("server", server_cfg), ("client", client_cfg)] {
        let path = dir.join(format!("haproxy-{role}.cfg"));
        std::fs::write(&path, cfg)?;
        let check = Command::new(&args.haproxy)
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()?;
        if !check.status.success() {
            bail!(
                "haproxy -c -f {}: {}{}",
                path.display(),
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let mut cmd = Command::new(&args.haproxy);
        cmd.arg("-db").arg("-f").arg(&path);
        procs.push((
            role,
            Proc::spawn(
                &format!("haproxy {role}"),
                cmd,
                dir.join(format!("haproxy-{role}.log")),
            )?,
        ));
    }
    procs.reverse();
    let mut chain = Chain {
        name: "haproxy",
        url: format!("http://127.0.0.1:{c_port}/"),
        proxies: procs,
        unavailable: None,
    };
    ready(&mut chain).await?;
    Ok(chain)
}

/// weft's control plane for D2 and the idle check: a global (memory store), a zone with its
/// data-plane API, the `default` mesh with builtin mTLS and a MeshTrafficPermission allowing
/// everything.
struct WeftEnv {
    global: Global,
    zone: ZoneProc,
}

/// A `weft-zone` process joined to `global`, with its data-plane API on a port of ours
/// (spawned here rather than with the harness's `Zone` so the flags are exactly these).
struct ZoneProc {
    proc: Proc,
    data_dir: tempfile::TempDir,
    api: Api,
    name: String,
    /// The data-plane API's port (proxies and ingresses register there).
    dp_api_port: u16,
}

impl ZoneProc {
    async fn start(global: &Global, name: &str, dp_api_port: u16) -> anyhow::Result<ZoneProc> {
        let data_dir = tempfile::Builder::new().prefix("bench-zone-").tempdir()?;
        let d = data_dir.path();
        let token = global.zone_token(name, "24h").await?;
        std::fs::write(d.join("zone-token"), &token.token)?;
        std::fs::copy(global.ca_file(), d.join("global-ca.pem"))?;
        let api_port = free_port();
        let mut cmd = Command::new(sibling_bin("weft-zone")?);
        cmd.arg("run")
            .arg("--zone")
            .arg(name)
            .arg("--api-address")
            .arg(format!("127.0.0.1:{api_port}"))
            .arg("--data-dir")
            .arg(d)
            .arg("--global-address")
            .arg(global.kds_address())
            .arg("--zone-token-file")
            .arg(d.join("zone-token"))
            .arg("--global-ca-file")
            .arg(d.join("global-ca.pem"))
            .arg("--dataplane-address")
            .arg(format!("127.0.0.1:{dp_api_port}"))
            .env("WEFT_LOG", "info");
        let mut proc = Proc::spawn(&format!("weft-zone {name}"), cmd, d.join("zone.log"))?;
        let url = format!("http://127.0.0.1:{api_port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            proc.check_alive()?;
            if let Ok(r) = http.get(format!("{url}/readyz")).send().await
                && r.status().is_success()
                && let Ok(t) = std::fs::read_to_string(d.join("admin-token"))
                && !t.trim().is_empty()
                && d.join("dataplane-ca.pem").exists()
            {
                let api = Api::new(url, t.trim().to_string());
                return Ok(ZoneProc {
                    proc,
                    data_dir,
                    api,
                    name: name.to_string(),
                    dp_api_port,
                });
            }
            if Instant::now() > deadline {
                bail!(
                    "weft-zone {name} not ready after 30s:\n{}",
                    proc.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn api(&self) -> Api {
        self.api.clone()
    }

    /// Wait for the `default` mesh (with mTLS) and the allow-all policy to reach this zone.
    async fn wait_synced(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mesh = self.api().get("/meshes/default").await.ok().flatten();
            let mtp = self
                .api()
                .get("/meshes/default/meshtrafficpermissions/allow-all")
                .await
                .ok()
                .flatten();
            if mesh.is_some_and(|m| !m["spec"]["mtls"].is_null()) && mtp.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "zone {}: mesh and policy not synced after 30s:\n{}",
                    self.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.data_dir.path().join("dataplane-ca.pem")
    }

    fn dp_api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.dp_api_port)
    }

    fn logs(&self) -> String {
        self.proc.log_tail(30)
    }
}

impl WeftEnv {
    async fn start(dir: &Path) -> anyhow::Result<WeftEnv> {
        let _ = dir;
        // weft-global and weft-zone are found next to this binary, like weft-dp.
        sibling_bin("weft-global")?;
        sibling_bin("weft-zone")?;
        let global = Global::start(Backend::Memory).await?;
        global
            .api()
            .apply(&[
                json!({"type": "Mesh", "name": "default", "spec": {"mtls": {
                    "enabledBackend": "ca-1",
                    "backends": [{"name": "ca-1", "type": "builtin"}]}}}),
                json!({"type": "MeshTrafficPermission", "name": "allow-all", "mesh": "default",
                    "spec": {"targetRef": {"kind": "Mesh"},
                             "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]}}),
            ])
            .await?;
        let zone = ZoneProc::start(&global, "zone-1", free_port()).await?;
        zone.wait_synced().await?;
        Ok(WeftEnv { global, zone })
    }

    async fn token(&self, name: &str, service: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        let token = self.token_text(name, service).await?;
        let path = dir.join(format!("{name}.token"));
        std::fs::write(&path, token)?;
        Ok(path)
    }

    async fn token_text(&self, name: &str, service: &str) -> anyhow::Result<String> {
        let r = self
            .global
            .req(Method::POST, "/_tokens/dataplane")
            .json(&json!({"mesh": "default", "name": name, "service": service, "validFor": "24h"}))
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST /_tokens/dataplane: {status}: {body}");
        }
        Ok(body["token"].as_str().context("no token")?.to_string())
    }

    /// Start `weft-dp run` for `dataplane` (YAML) in `zone`; waits for `/ready`.
    async fn dp(
        &self,
        zone: &ZoneProc,
        dir: &Path,
        name: &str,
        service: &str,
        dataplane: &str,
    ) -> anyhow::Result<(Proc, u16)> {
        self.dp_env(zone, dir, name, service, dataplane, Launch::default())
            .await
    }

    /// [`WeftEnv::dp`], started as `launch` says.
    async fn dp_env(
        &self,
        zone: &ZoneProc,
        dir: &Path,
        name: &str,
        service: &str,
        dataplane: &str,
        launch: Launch<'_>,
    ) -> anyhow::Result<(Proc, u16)> {
        let bin = match launch.bin {
            Some(b) => b.to_path_buf(),
            None => weft_dp_bin()?,
        };
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, dataplane)?;
        let token = self.token(name, service, dir).await?;
        let admin = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--zone-address")
            .arg(zone.dp_api_url())
            .arg("--zone-ca-file")
            .arg(zone.ca_file())
            .arg("--dataplane-file")
            .arg(&file)
            .arg("--token-file")
            .arg(&token)
            .arg("--admin-address")
            .arg(format!("127.0.0.1:{admin}"))
            .arg("--log-level")
            .arg("warn");
        for kv in launch.env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--idle-env {kv:?}: expected KEY=VALUE"))?;
            cmd.env(k, v);
        }
        let mut p = Proc::spawn(
            &format!("weft-dp {name}"),
            cmd,
            dir.join(format!("weft-dp-{name}.log")),
        )?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            p.check_alive()?;
            if let Ok(r) = http
                .get(format!("http://127.0.0.1:{admin}/ready"))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok((p, admin));
            }
            if Instant::now() > deadline {
                bail!(
                    "weft-dp {name}: /ready not 200 after 60s; log:\n{}\nzone log tail:\n{}",
                    p.log_tail(30),
                    tail(&zone.logs(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// D2-alt: the D2 pair with another weft-dp binary (`--alt-weft-dp`).
    async fn alt_pair(&self, dir: &Path, up_port: u16, bin: &Path) -> anyhow::Result<Chain> {
        let co = free_port();
        let server = server_yaml("server-alt-1", "server-alt", free_port(), up_port);
        let client = client_yaml("client-alt-1", "client-alt", "server-alt", co);
        let (s, _) = self
            .dp_env(
                &self.zone,
                dir,
                "server-alt-1",
                "server-alt",
                &server,
                Launch::binary(bin),
            )
            .await?;
        let (c, _) = self
            .dp_env(
                &self.zone,
                dir,
                "client-alt-1",
                "client-alt",
                &client,
                Launch::binary(bin),
            )
            .await?;
        let mut chain = Chain {
            name: "D2-alt",
            url: format!("http://127.0.0.1:{co}/"),
            proxies: vec![("client", c), ("server", s)],
            unavailable: None,
        };
        ready(&mut chain).await?;
        Ok(chain)
    }

    async fn pair(&self, dir: &Path, up_port: u16) -> anyhow::Result<Chain> {
        let (si, ci, cs, co) = (free_port(), free_port(), free_port(), free_port());
        let server = format!(
            "type: Dataplane
name: server-1
mesh: default
spec:
  networking:
    address: 127.0.0.1
    inbound:
      - port: {si}
        servicePort: {up_port}
        tags: {{weft.io/service: server}}
        protocol: http
"
        );
        let client = format!(
            "type: Dataplane
name: client-1
mesh: default
spec:
  networking:
    address: 127.0.0.1
    inbound:
      - port: {ci}
        servicePort: {cs}
        tags: {{weft.io/service: client}}
        protocol: http
    outbound:
      - port: {co}
        tags: {{weft.io/service: server}}
"
        );
        let (s, _) = self
            .dp(&self.zone, dir, "server-1", "server", &server)
            .await?;
        let (c, _) = self
            .dp(&self.zone, dir, "client-1", "client", &client)
            .await?;
        let mut chain = Chain {
            name: "D2",
            url: format!("http://127.0.0.1:{co}/"),
            proxies: vec![("client", c), ("server", s)],
            unavailable: None,
        };
        ready(&mut chain).await?;
        Ok(chain)
    }

    /// The idle check: `n` services registered in the zone (one online fake proxy each, over
    /// the data-plane API), one weft-dp with an outbound to each; its memory once ready,
    /// beside the same weft-dp with no outbound (the baseline: what the binary costs).
    async fn idle(&self, args: &Args, dir: &Path, n: usize) -> anyhow::Result<Idle> {
        let launch = Launch {
            env: &args.idle_env,
            bin: args.idle_weft_dp.as_deref(),
        };
        let baseline_yaml = idle_yaml("idle-0", 0);
        let (p0, _) = self
            .dp_env(&self.zone, dir, "idle-0", "idle", &baseline_yaml, launch)
            .await
            .context("baseline weft-dp (no outbound)")?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let baseline_ready = memory(p0.pid())?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let baseline_later = memory(p0.pid())?;
        drop(p0);

        // Online services: one registered session per service, so every service the idle
        // proxy calls has an endpoint; if that cannot be done, Dataplanes through the REST
        // API (services without endpoints: the zone only sends endpoints of online proxies).
        let mut how =
            format!("{n} fake proxies registered over the zone's data-plane API, one per service");
        let sessions = match self.register(n).await {
            Ok(s) => s,
            Err(e) => {
                how = format!(
                    "{n} Dataplanes applied through the zone's REST API, offline (registering sessions failed: {e:#})"
                );
                let docs: Vec<Value> = (0..n).map(fake_dataplane).collect();
                for chunk in docs.chunks(250) {
                    self.zone
                        .api()
                        .apply(chunk)
                        .await
                        .context("registering the services' Dataplanes on the zone")?;
                }
                Vec::new()
            }
        };
        let yaml = idle_yaml("idle-1", n);
        let (p, admin) = self
            .dp_env(&self.zone, dir, "idle-1", "idle", &yaml, launch)
            .await?;
        // Let it settle (first full update applied, allocator quiet).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let ready = memory(p.pid())?;
        let config = reqwest::get(format!("http://127.0.0.1:{admin}/config"))
            .await
            .ok();
        let config = match config {
            Some(r) => r.text().await.unwrap_or_default(),
            None => String::new(),
        };
        let (services, with_endpoints) = count_services(&config);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let later = memory(p.pid())?;
        drop(sessions);
        Ok(Idle {
            how,
            env: args.idle_env.clone(),
            services: n,
            ready,
            later,
            baseline_ready,
            baseline_later,
            config_services: services,
            config_with_endpoints: with_endpoints,
        })
    }

    /// D3: a weft-dp in zone-1 whose only endpoint for `backend` is zone-2's weft-ingress,
    /// which routes by SNI to the `backend` weft-dp in zone-2. Returns the chain and what
    /// must stay up while it runs (zone-2).
    async fn d3_weft(&self, dir: &Path, up_port: u16) -> anyhow::Result<(Chain, D3Env)> {
        let zone = ZoneProc::start(&self.global, "zone-2", free_port()).await?;
        zone.wait_synced().await?;
        let (server, _) = self
            .dp(
                &zone,
                dir,
                "backend-1",
                "backend",
                &server_yaml("backend-1", "backend", free_port(), up_port),
            )
            .await?;
        let ingress = self.weft_ingress(&zone, dir, "ingress-1").await?;
        let (client, _) = self
            .dp(
                &self.zone,
                dir,
                "front-1",
                "front",
                &client_yaml("front-1", "front", "backend", free_port()),
            )
            .await?;
        let co = outbound_port(dir, "front-1")?;
        let mut chain = Chain {
            name: "D3",
            url: format!("http://127.0.0.1:{co}/"),
            proxies: vec![("client", client), ("ingress", ingress), ("server", server)],
            unavailable: None,
        };
        ready_within(&mut chain, Duration::from_secs(60)).await?;
        Ok((
            chain,
            D3Env {
                _zone: zone,
                _sessions: Vec::new(),
            },
        ))
    }

    /// D3-haproxy: the same chain through zone-3, whose ingress is HAProxy in TCP mode
    /// (`tcp-request inspect-delay`, `req.ssl_sni` routing to the backend's weft-dp). zone-3
    /// learns HAProxy's address from a ZoneIngress registered over its data-plane API (an
    /// ingress session held by this benchmark, acking the zone's updates), exactly as
    /// weft-ingress registers itself; the zone-1 proxy's endpoint is then HAProxy's port.
    async fn d3_haproxy(
        &self,
        args: &Args,
        dir: &Path,
        up_port: u16,
    ) -> anyhow::Result<(Chain, D3Env)> {
        check_tool(&args.haproxy, "-v")?;
        let zone = ZoneProc::start(&self.global, "zone-3", free_port()).await?;
        zone.wait_synced().await?;
        let si = free_port();
        let (server, _) = self
            .dp(
                &zone,
                dir,
                "backend-h-1",
                "backend-h",
                &server_yaml("backend-h-1", "backend-h", si, up_port),
            )
            .await?;
        let port = free_port();
        let sni = weft_core::names::Sni::new("default", "backend-h", "zone-3").to_string();
        let cfg = format!(
            "global
    nbthread 1
    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend zone_ingress
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend backend_h if {{ req.ssl_sni -i {sni} }}

backend backend_h
    server backend-h-1 127.0.0.1:{si}
"
        );
        let path = dir.join("haproxy-ingress.cfg");
        std::fs::write(&path, cfg)?;
        let check = Command::new(&args.haproxy)
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()?;
        if !check.status.success() {
            bail!(
                "haproxy -c -f {}: {}{}",
                path.display(),
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let mut cmd = Command::new(&args.haproxy);
        cmd.arg("-db").arg("-f").arg(&path);
        let ingress = Proc::spawn("haproxy ingress", cmd, dir.join("haproxy-ingress.log"))?;
        // The ZoneIngress weft-ingress would send for itself, with HAProxy's address.
        let resource = json!({"type": "ZoneIngress", "name": "haproxy",
            "spec": {"networking": {"address": "127.0.0.1", "port": port}}});
        let token = self.ingress_token("zone-3").await?;
        let channel = dp_api_channel(&zone).await?;
        let session = open_session(channel, "ingress haproxy", token, resource.to_string())
            .await
            .context("registering HAProxy as zone-3's ZoneIngress")?;
        let (client, _) = self
            .dp(
                &self.zone,
                dir,
                "front-h-1",
                "front-h",
                &client_yaml("front-h-1", "front-h", "backend-h", free_port()),
            )
            .await?;
        let co = outbound_port(dir, "front-h-1")?;
        let mut chain = Chain {
            name: "D3-haproxy",
            url: format!("http://127.0.0.1:{co}/"),
            proxies: vec![("client", client), ("ingress", ingress), ("server", server)],
            unavailable: None,
        };
        ready_within(&mut chain, Duration::from_secs(60)).await?;
        Ok((
            chain,
            D3Env {
                _zone: zone,
                _sessions: vec![session],
            },
        ))
    }

    /// A zone token with scope `ingress` for `zone` (`POST /_tokens/zone`).
    async fn ingress_token(&self, zone: &str) -> anyhow::Result<String> {
        let r = self
            .global
            .req(Method::POST, "/_tokens/zone")
            .json(&json!({"zone": zone, "scope": "ingress", "validFor": "24h"}))
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST /_tokens/zone (scope ingress): {status}: {body}");
        }
        Ok(body["token"].as_str().context("no token")?.to_string())
    }

    /// Start `weft-ingress run --mode ingress` in `zone` (defaults: one thread); waits for
    /// `/ready` (registered, routing table received).
    async fn weft_ingress(&self, zone: &ZoneProc, dir: &Path, name: &str) -> anyhow::Result<Proc> {
        let token = dir.join(format!("{name}.token"));
        std::fs::write(&token, self.ingress_token(&zone.name).await?)?;
        let (port, admin) = (free_port(), free_port());
        let mut cmd = Command::new(sibling_bin("weft-ingress")?);
        cmd.arg("run")
            .arg("--mode")
            .arg("ingress")
            .arg("--name")
            .arg(name)
            .arg("--zone-address")
            .arg(zone.dp_api_url())
            .arg("--zone-ca-file")
            .arg(zone.ca_file())
            .arg("--token-file")
            .arg(&token)
            .arg("--address")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-address")
            .arg(format!("127.0.0.1:{admin}"))
            .arg("--log-level")
            .arg("warn");
        let mut p = Proc::spawn(
            &format!("weft-ingress {name}"),
            cmd,
            dir.join(format!("weft-ingress-{name}.log")),
        )?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            p.check_alive()?;
            if let Ok(r) = http
                .get(format!("http://127.0.0.1:{admin}/ready"))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!(
                    "weft-ingress {name}: /ready not 200 after 60s; log:\n{}\nzone log tail:\n{}",
                    p.log_tail(30),
                    tail(&zone.logs(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `--weft-dp`, once parsed.
static WEFT_DP: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The weft-dp binary: `--weft-dp`, else the one next to this binary.
fn weft_dp_bin() -> anyhow::Result<PathBuf> {
    match WEFT_DP.get() {
        Some(path) => {
            anyhow::ensure!(
                path.exists(),
                "--weft-dp {}: not built (cargo build --profile sidecar -p weft-dp)",
                path.display()
            );
            Ok(path.clone())
        }
        None => sibling_bin("weft-dp"),
    }
}

/// How [`WeftEnv::dp_env`] starts weft-dp: extra environment (KEY=VALUE) and another
/// binary than [`weft_dp_bin`].
#[derive(Clone, Copy, Default)]
struct Launch<'a> {
    env: &'a [String],
    bin: Option<&'a Path>,
}

impl<'a> Launch<'a> {
    fn binary(bin: &'a Path) -> Launch<'a> {
        Launch {
            env: &[],
            bin: Some(bin),
        }
    }
}

/// What a D3 chain needs besides its proxies: its zone, and (HAProxy) the ingress session.
struct D3Env {
    _zone: ZoneProc,
    _sessions: Vec<Session>,
}

/// The Dataplane of a server-side proxy: service `service`, inbound `port` -> the upstream.
fn server_yaml(name: &str, service: &str, port: u16, up_port: u16) -> String {
    format!(
        "type: Dataplane
name: {name}
mesh: default
spec:
  networking:
    address: 127.0.0.1
    inbound:
      - port: {port}
        servicePort: {up_port}
        tags: {{weft.io/service: {service}}}
        protocol: http
"
    )
}

/// The Dataplane of a client-side proxy of `service` with one outbound, to `target`, on
/// `port` (written into the YAML; [`outbound_port`] reads it back).
fn client_yaml(name: &str, service: &str, target: &str, port: u16) -> String {
    format!(
        "type: Dataplane
name: {name}
mesh: default
spec:
  networking:
    address: 127.0.0.1
    inbound:
      - port: {}
        servicePort: {}
        tags: {{weft.io/service: {service}}}
        protocol: http
    outbound:
      - port: {port}
        tags: {{weft.io/service: {target}}}
",
        free_port(),
        free_port()
    )
}

/// The outbound port of the client Dataplane `name` written by [`WeftEnv::dp`].
fn outbound_port(dir: &Path, name: &str) -> anyhow::Result<u16> {
    let yaml = std::fs::read_to_string(dir.join(format!("{name}.yaml")))?;
    let after = yaml.split("outbound:").nth(1).context("no outbound")?;
    let line = after
        .lines()
        .find_map(|l| l.trim().strip_prefix("- port:"))
        .context("no outbound port")?;
    Ok(line.trim().parse()?)
}

/// The idle proxy's Dataplane: one inbound, outbounds to `svc-0000` .. `svc-<n-1>`.
fn idle_yaml(name: &str, n: usize) -> String {
    let mut yaml = format!(
        "type: Dataplane
name: {name}
mesh: default
spec:
  networking:
    address: 127.0.0.1
    inbound:
      - port: {}
        servicePort: {}
        tags: {{weft.io/service: idle}}
        protocol: http
",
        free_port(),
        free_port()
    );
    if n > 0 {
        yaml.push_str("    outbound:\n");
    }
    for i in 0..n {
        let _ = writeln!(
            yaml,
            "      - port: {}\n        tags: {{weft.io/service: svc-{i:04}}}",
            free_port()
        );
    }
    yaml
}

/// What `/proc/<pid>/status` says about a process's memory.
#[derive(Clone, Debug, Default)]
struct Memory {
    fields: Vec<(String, u64)>,
    /// Rss KiB per mapping, the largest first (`/proc/<pid>/smaps`).
    mappings: Vec<(String, u64)>,
}

impl Memory {
    fn get(&self, key: &str) -> u64 {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map_or(0, |(_, v)| *v)
    }

    fn describe(&self) -> String {
        format!(
            "VmRSS {} KiB (RssAnon {}, RssFile {}, RssShmem {}), VmData {} KiB, {} threads",
            self.get("VmRSS"),
            self.get("RssAnon"),
            self.get("RssFile"),
            self.get("RssShmem"),
            self.get("VmData"),
            self.get("Threads")
        ) + &format!(
            "; largest: {}",
            self.mappings
                .iter()
                .take(5)
                .map(|(name, kib)| {
                    let short = name.rsplit('/').next().unwrap_or(name);
                    format!("{short} {kib} KiB")
                })
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

fn memory(pid: u32) -> anyhow::Result<Memory> {
    Ok(Memory {
        fields: weft_bench::status_fields(
            pid,
            &[
                "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmData", "VmStk", "Threads",
            ],
        )?,
        mappings: weft_bench::rss_by_mapping(pid).unwrap_or_default(),
    })
}

/// The Dataplane of fake service `i`: `svc-NNNN-1` serving `svc-NNNN` on 127.0.0.1:20000+i
/// (nothing listens there: the idle proxy never calls it).
fn fake_dataplane(i: usize) -> Value {
    json!({"type": "Dataplane", "name": format!("svc-{i:04}-1"), "mesh": "default",
           "spec": {"networking": {"address": "127.0.0.1", "inbound": [
               {"port": 20000 + i, "tags": {"weft.io/service": format!("svc-{i:04}")},
                "protocol": "http"}]}}})
}

/// A fake proxy's open session: dropping it ends the stream.
struct Session {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WeftEnv {
    /// Register `n` fake proxies (`fake_dataplane(i)`) over the data-plane API: Hello with a
    /// token, Ack every Update, until dropped. 100 streams per connection.
    async fn register(&self, n: usize) -> anyhow::Result<Vec<Session>> {
        let mut sessions = Vec::with_capacity(n);
        let mut channel = None;
        for i in 0..n {
            if i % 100 == 0 {
                channel = Some(dp_api_channel(&self.zone).await?);
            }
            let name = format!("svc-{i:04}-1");
            let token = self.token_text(&name, &format!("svc-{i:04}")).await?;
            let channel = channel.clone().expect("connected above");
            let doc = fake_dataplane(i).to_string();
            sessions.push(open_session(channel, &name, token, doc).await?);
        }
        Ok(sessions)
    }
}

/// A TLS channel to `zone`'s data-plane API.
async fn dp_api_channel(zone: &ZoneProc) -> anyhow::Result<tonic::transport::Channel> {
    let ca = std::fs::read_to_string(zone.ca_file())?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
        .domain_name("127.0.0.1");
    tonic::transport::Endpoint::from_shared(zone.dp_api_url())?
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("connecting to zone {}'s data-plane API", zone.name))
}

/// Open a data-plane API stream with `Hello { token, dataplane: resource }` (a Dataplane or
/// a ZoneIngress), wait for `Registered`, then Ack every Update until the session is dropped.
async fn open_session(
    channel: tonic::transport::Channel,
    name: &str,
    token: String,
    resource: String,
) -> anyhow::Result<Session> {
    use pb::dataplane_discovery_client::DataplaneDiscoveryClient;
    use weft_proto::dataplane::v1 as pb;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ProxyMessage>(16);
    tx.send(pb::ProxyMessage {
        msg: Some(pb::proxy_message::Msg::Hello(pb::Hello {
            token,
            dataplane: resource,
            version: "bench".into(),
            has_config: false,
            virtual_outbounds: false,
        })),
    })
    .await?;
    let mut client = DataplaneDiscoveryClient::new(channel).max_decoding_message_size(16 << 20);
    let mut incoming = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .with_context(|| format!("stream of {name}"))?
        .into_inner();
    // Wait for Registered, so a refusal is reported here.
    match tokio::time::timeout(Duration::from_secs(10), incoming.message()).await {
        Ok(Ok(Some(pb::ZoneMessage {
            msg: Some(pb::zone_message::Msg::Registered(_)),
        }))) => {}
        other => bail!("{name}: expected Registered, got {other:?}"),
    }
    let task = tokio::spawn(async move {
        while let Ok(Some(m)) = incoming.message().await {
            if let Some(pb::zone_message::Msg::Update(u)) = m.msg {
                let ack = pb::ProxyMessage {
                    msg: Some(pb::proxy_message::Msg::Ack(pb::Ack { nonce: u.nonce })),
                };
                if tx.send(ack).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Session { task })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// From weft-dp's `/config` JSON: how many services it holds, and how many have endpoints
/// (`None` when the document does not have that shape).
fn count_services(config: &str) -> (Option<usize>, Option<usize>) {
    let Ok(v) = serde_json::from_str::<Value>(config) else {
        return (None, None);
    };
    let services = &v["services"];
    let list: Vec<&Value> = match services {
        Value::Object(m) => m.values().collect(),
        Value::Array(a) => a.iter().collect(),
        _ => return (None, None),
    };
    let with = list
        .iter()
        .filter(|s| s["endpoints"].as_array().is_some_and(|e| !e.is_empty()))
        .count();
    (Some(list.len()), Some(with))
}

struct Idle {
    how: String,
    /// The idle proxies' extra environment (`--idle-env`).
    env: Vec<String>,
    services: usize,
    ready: Memory,
    later: Memory,
    /// The same proxy with no outbound.
    baseline_ready: Memory,
    baseline_later: Memory,
    config_services: Option<usize>,
    config_with_endpoints: Option<usize>,
}

// ---------------------------------------------------------------------------------------------
// Measuring

async fn oha(args: &Args, load: Load, duration: Duration, url: &str) -> anyhow::Result<Value> {
    let mut cmd = tokio::process::Command::new(&args.oha);
    cmd.arg("--no-tui")
        .arg("--output-format")
        .arg("json")
        .arg("-z")
        .arg(format!("{}ms", duration.as_millis()))
        .arg("--wait-ongoing-requests-after-deadline");
    match load {
        Load::Rate(r) => {
            cmd.arg("-q")
                .arg(r.to_string())
                .arg("--latency-correction")
                .arg("-c")
                .arg(args.rate_connections.to_string());
        }
        Load::Max => {
            cmd.arg("-c").arg(args.max_connections.to_string());
        }
    }
    cmd.arg(url);
    let out = cmd.output().await.context("running oha")?;
    if !out.status.success() {
        bail!(
            "oha failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "oha output is not JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn measure(args: &Args, c: &mut Chain, load: Load, run: usize) -> anyhow::Result<Sample> {
    for (_, p) in c.proxies.iter_mut() {
        p.check_alive()?;
    }
    let before: Vec<u64> = c
        .proxies
        .iter()
        .map(|(_, p)| cpu_ticks(p.pid()))
        .collect::<anyhow::Result<_>>()?;
    let v = oha(args, load, args.duration, &c.url).await?;
    let after: Vec<u64> = c
        .proxies
        .iter()
        .map(|(_, p)| cpu_ticks(p.pid()))
        .collect::<anyhow::Result<_>>()?;

    let ok: u64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.starts_with('2'))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0);
    let all: u64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    let errors: u64 = (all - ok)
        + v["errorDistribution"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum::<u64>())
            .unwrap_or(0);
    if ok == 0 {
        bail!("no successful request: {v}");
    }
    let pct = |k: &str| -> anyhow::Result<f64> {
        Ok(v["latencyPercentiles"][k]
            .as_f64()
            .with_context(|| format!("no latencyPercentiles.{k} in {v}"))?
            * 1000.0)
    };
    let elapsed = v["summary"]["total"]
        .as_f64()
        .unwrap_or(args.duration.as_secs_f64());
    let us_per_tick = 1e6 / ticks_per_second() as f64;
    let mut cpu_us = BTreeMap::new();
    let mut rss = BTreeMap::new();
    for (i, (role, p)) in c.proxies.iter().enumerate() {
        cpu_us.insert(
            *role,
            (after[i] - before[i]) as f64 * us_per_tick / ok as f64,
        );
        rss.insert(*role, rss_kib(p.pid())?);
    }
    Ok(Sample {
        chain: c.name,
        load,
        run,
        p50_ms: pct("p50")?,
        p90_ms: pct("p90")?,
        p99_ms: pct("p99")?,
        rps: ok as f64 / elapsed,
        requests: ok,
        errors,
        cpu_us,
        rss_kib: rss,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians across runs of one chain at one load.
struct Row {
    runs: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    rps: f64,
    errors: u64,
    cpu: BTreeMap<&'static str, f64>,
    pair: Option<f64>,
    rss_mib: BTreeMap<&'static str, f64>,
}

fn row(samples: &[&Sample]) -> Row {
    let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(|s| f(s)).collect());
    let roles: Vec<&'static str> = samples
        .first()
        .map(|s| s.cpu_us.keys().copied().collect())
        .unwrap_or_default();
    let cpu = roles.iter().map(|r| (*r, m(&|s| s.cpu_us[r]))).collect();
    let pair = (!roles.is_empty()).then(|| m(&|s| s.cpu_us.values().sum()));
    let rss_mib = roles
        .iter()
        .map(|r| {
            let max = samples.iter().map(|s| s.rss_kib[r]).max().unwrap_or(0);
            (*r, max as f64 / 1024.0)
        })
        .collect();
    Row {
        runs: samples.len(),
        p50: m(&|s| s.p50_ms),
        p90: m(&|s| s.p90_ms),
        p99: m(&|s| s.p99_ms),
        rps: m(&|s| s.rps),
        errors: samples.iter().map(|s| s.errors).sum(),
        cpu,
        pair,
        rss_mib,
    }
}

fn report(
    args: &Args,
    chains: &[Chain],
    loads: &[Load],
    samples: &[Sample],
    idle: Option<&Result<Idle, String>>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench-proxy: {} run(s) per chain and load, alternating; {:?} per measurement; HTTP/1.1 keep-alive, 1 KiB responses; \
         latency by oha (fixed rates: -q with --latency-correction); medians across runs; RSS: max VmRSS after a measurement",
        args.runs, args.duration
    );
    let _ = writeln!(
        out,
        "weft-dp: {}",
        weft_dp_bin().map_or_else(|e| format!("{e:#}"), |p| p.display().to_string())
    );
    let _ = writeln!(
        out,
        "CPU: utime+stime from /proc/<pid>/stat ({} ticks/s) per successful request; all processes share {} cores with the load generator",
        ticks_per_second(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for c in chains {
        if let Some(why) = &c.unavailable {
            let _ = writeln!(out, "\n!! {} did not run: {}", c.name, first_lines(why, 12));
        }
    }
    // load -> chain -> row
    let mut rows: BTreeMap<Load, BTreeMap<&str, Row>> = BTreeMap::new();
    for load in loads {
        for c in chains {
            let s: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.load == *load && s.chain == c.name)
                .collect();
            if !s.is_empty() {
                rows.entry(*load).or_default().insert(c.name, row(&s));
            }
        }
    }
    for load in loads {
        let _ = writeln!(out, "\n## {}", load.label(args));
        let _ = writeln!(
            out,
            "| chain | runs | p50 ms | p90 ms | p99 ms | added p50 ms | req/s | errors | CPU µs/req client | CPU µs/req server | CPU µs/req pair | RSS MiB client | RSS MiB server |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let Some(by_chain) = rows.get(load) else {
            continue;
        };
        let d0 = by_chain.get("D0").map(|r| r.p50);
        for c in chains.iter().filter(|c| !is_d3(c.name)) {
            let Some(r) = by_chain.get(c.name) else {
                let _ = writeln!(out, "| {} | 0 | did not run | | | | | | | | | | |", c.name);
                continue;
            };
            let f = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
            let added = d0.filter(|_| c.name != "D0").map(|d| r.p50 - d);
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {:.3} | {:.3} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
                c.name,
                r.runs,
                r.p50,
                r.p90,
                r.p99,
                f(added, 3),
                r.rps,
                r.errors,
                f(r.cpu.get("client").copied(), 1),
                f(r.cpu.get("server").copied(), 1),
                f(r.pair, 1),
                f(r.rss_mib.get("client").copied(), 1),
                f(r.rss_mib.get("server").copied(), 1),
            );
        }
    }

    if chains.iter().any(|c| is_d3(c.name)) {
        d3_tables(&mut out, args, chains, loads, &rows);
    }

    let _ = writeln!(out, "\n## Goals");
    for load in loads {
        let by_chain = rows.get(load);
        let get = |n: &str| by_chain.and_then(|m| m.get(n));
        let label = load.label(args);
        match (get("D2"), get("haproxy")) {
            (Some(w), Some(h)) => {
                let (wp, hp) = (w.pair.unwrap_or(f64::NAN), h.pair.unwrap_or(f64::NAN));
                let _ = writeln!(
                    out,
                    "- {label}: CPU/req weft pair {wp:.1} µs vs HAProxy pair {hp:.1} µs: ratio {:.2} (goal <= 0.50): {}",
                    wp / hp,
                    pass(wp <= 0.5 * hp)
                );
                if let Some(d0) = get("D0") {
                    let (wa, ha) = (w.p50 - d0.p50, h.p50 - d0.p50);
                    let _ = writeln!(
                        out,
                        "- {label}: added p50 weft {wa:.3} ms vs HAProxy {ha:.3} ms (goal: weft < HAProxy): {}",
                        pass(wa < ha)
                    );
                }
            }
            _ => {
                let _ = writeln!(
                    out,
                    "- {label}: not checked: D2 or haproxy has no measurement"
                );
            }
        }
    }
    if chains.iter().any(|c| is_d3(c.name)) {
        for load in loads {
            let by_chain = rows.get(load);
            let get = |n: &str| by_chain.and_then(|m| m.get(n));
            let label = load.label(args);
            let cpu = |r: &Row| r.cpu.get("ingress").copied().unwrap_or(f64::NAN);
            match get("D3") {
                Some(w) => {
                    let _ = writeln!(
                        out,
                        "- {label}: CPU/req weft-ingress {:.1} µs (goal <= 10 µs): {}",
                        cpu(w),
                        pass(cpu(w) <= 10.0)
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "- {label}: weft-ingress not checked: D3 has no measurement"
                    );
                }
            }
            match (get("D3"), get("D3-haproxy")) {
                (Some(w), Some(h)) => {
                    let _ = writeln!(
                        out,
                        "- {label}: CPU/req weft-ingress {:.1} µs vs HAProxy ingress {:.1} µs (goal: weft < HAProxy): {}",
                        cpu(w),
                        cpu(h),
                        pass(cpu(w) < cpu(h))
                    );
                }
                _ => {
                    let _ = writeln!(
                        out,
                        "- {label}: ingress comparison not checked: D3 or D3-haproxy has no measurement"
                    );
                }
            }
        }
    }
    match idle {
        None => {
            let _ = writeln!(out, "- idle weft-dp RSS: not measured (--idle-services 0)");
        }
        Some(Err(e)) => {
            let _ = writeln!(
                out,
                "- idle weft-dp RSS with {} services: did not run: {}",
                args.idle_services,
                first_lines(e, 12)
            );
        }
        Some(Ok(i)) => {
            let rss = i.later.get("VmRSS").max(i.ready.get("VmRSS"));
            let mb = rss as f64 * 1024.0 / 1e6;
            let cfg = match (i.config_services, i.config_with_endpoints) {
                (Some(s), Some(e)) => {
                    format!("its /config lists {s} services, {e} of them with endpoints")
                }
                _ => "its /config did not list services in a shape this benchmark reads".into(),
            };
            let mut env = if i.env.is_empty() {
                String::new()
            } else {
                format!(", environment {}", i.env.join(" "))
            };
            if let Some(b) = &args.idle_weft_dp {
                let _ = write!(env, ", binary {}", b.display());
            }
            let _ = writeln!(
                out,
                "- idle weft-dp with outbounds to {} services ({}; {cfg}{env}): VmRSS {} KiB when ready, {} KiB 5 s later = {mb:.2} MB (goal < 10 MB): {}",
                i.services,
                i.how,
                i.ready.get("VmRSS"),
                i.later.get("VmRSS"),
                pass(mb < 10.0)
            );
            let _ = writeln!(
                out,
                "  - with {} services, when ready: {}\n  - with {} services, 5 s later: {}\n  - baseline (no outbound), when ready: {}\n  - baseline (no outbound), 5 s later: {}",
                i.services,
                i.ready.describe(),
                i.services,
                i.later.describe(),
                i.baseline_ready.describe(),
                i.baseline_later.describe()
            );
        }
    }
    out
}

/// The chains with an ingress between the sidecars (reported in their own tables).
fn is_d3(name: &str) -> bool {
    name.starts_with("D3")
}

/// Per load: D0 and D2 for reference, then D3 and D3-haproxy, with the ingress's CPU and RSS
/// and what the ingress hop adds to D2's p50.
fn d3_tables(
    out: &mut String,
    args: &Args,
    chains: &[Chain],
    loads: &[Load],
    rows: &BTreeMap<Load, BTreeMap<&str, Row>>,
) {
    let _ = writeln!(
        out,
        "\n# D3: client -> weft-dp -> ingress -> weft-dp -> upstream (zone-1 -> zone-2/zone-3)"
    );
    for load in loads {
        let _ = writeln!(out, "\n## D3, {}", load.label(args));
        let _ = writeln!(
            out,
            "| chain | runs | p50 ms | p90 ms | p99 ms | added p50 ms vs D0 | added p50 ms vs D2 | req/s | errors | CPU µs/req client | CPU µs/req ingress | CPU µs/req server | CPU µs/req total | RSS MiB client | RSS MiB ingress | RSS MiB server |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let by_chain = rows.get(load);
        let get = |n: &str| by_chain.and_then(|m| m.get(n));
        let d0 = get("D0").map(|r| r.p50);
        let d2 = get("D2").map(|r| r.p50);
        let names = ["D0", "D2", "D3", "D3-haproxy"];
        for name in names {
            if !chains.iter().any(|c| c.name == name) {
                continue;
            }
            let Some(r) = get(name) else {
                let _ = writeln!(
                    out,
                    "| {name} | 0 | did not run | | | | | | | | | | | | | |"
                );
                continue;
            };
            let f = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
            let vs_d0 = d0.filter(|_| name != "D0").map(|d| r.p50 - d);
            let vs_d2 = d2.filter(|_| is_d3(name)).map(|d| r.p50 - d);
            let _ = writeln!(
                out,
                "| {name} | {} | {:.3} | {:.3} | {:.3} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.runs,
                r.p50,
                r.p90,
                r.p99,
                f(vs_d0, 3),
                f(vs_d2, 3),
                r.rps,
                r.errors,
                f(r.cpu.get("client").copied(), 1),
                f(r.cpu.get("ingress").copied(), 1),
                f(r.cpu.get("server").copied(), 1),
                f(r.pair, 1),
                f(r.rss_mib.get("client").copied(), 1),
                f(r.rss_mib.get("ingress").copied(), 1),
                f(r.rss_mib.get("server").copied(), 1),
            );
        }
    }
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

fn first_lines(s: &str, n: usize) -> String {
    s.lines().take(n).collect::<Vec<_>>().join("\n   ")
}
