//! Real `weft-dp` sidecars and the small applications behind them: a Dataplane file per
//! proxy, a dataplane token issued by global through `weftctl`, the proxy's admin API
//! (`/ready`, `/config`, `/metrics`), SIGTERM and kill -9; an HTTP app that answers with its
//! instance name and echoes who called it, a TCP echo app; and a load loop that counts failed
//! requests.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{Global, Proc, Zone, bin, free_port, get_json, get_text, ok, wait_admin_ready};

/// One inbound of a proxy: the sidecar's port, the app's port, the service and protocol.
#[derive(Clone, Debug)]
pub struct InboundSpec {
    pub port: u16,
    pub app_port: u16,
    pub service: String,
    pub protocol: String,
}

/// What to start: `Dataplane::builder("frontend-1", "frontend").outbound(port, "backend")`.
pub struct Builder {
    name: String,
    mesh: String,
    service: String,
    inbound: Option<InboundSpec>,
    outbounds: Vec<(u16, String)>,
    args: Vec<String>,
}

impl Builder {
    pub fn mesh(mut self, mesh: &str) -> Builder {
        self.mesh = mesh.to_string();
        self
    }

    /// The inbound in front of an app on `app_port` (`http`, `http2`, `grpc` or `tcp`); the
    /// sidecar's port is picked free.
    pub fn inbound(mut self, app_port: u16, protocol: &str) -> Builder {
        self.inbound = Some(InboundSpec {
            port: free_port(),
            app_port,
            service: self.service.clone(),
            protocol: protocol.to_string(),
        });
        self
    }

    /// A local listener on 127.0.0.1:`port` for `service`.
    pub fn outbound(mut self, port: u16, service: &str) -> Builder {
        self.outbounds.push((port, service.to_string()));
        self
    }

    /// Extra `weft-dp run` flags.
    pub fn args(mut self, args: &[&str]) -> Builder {
        self.args.extend(args.iter().map(ToString::to_string));
        self
    }

    /// The Dataplane document the proxy is started with.
    pub fn yaml(&self) -> String {
        let mut y = format!(
            "type: Dataplane\nname: {}\nmesh: {}\nspec:\n  networking:\n    address: 127.0.0.1\n",
            self.name, self.mesh
        );
        // A proxy with only outbounds still serves its service (the zone requires an inbound).
        let inbound = self.inbound.clone().unwrap_or(InboundSpec {
            port: free_port(),
            app_port: free_port(),
            service: self.service.clone(),
            protocol: "http".into(),
        });
        y += &format!(
            "    inbound:\n    - port: {}\n      servicePort: {}\n      protocol: {}\n      tags:\n        weft.io/service: {}\n",
            inbound.port, inbound.app_port, inbound.protocol, inbound.service
        );
        if !self.outbounds.is_empty() {
            y += "    outbound:\n";
            for (port, service) in &self.outbounds {
                y += &format!(
                    "    - port: {port}\n      tags:\n        weft.io/service: {service}\n"
                );
            }
        }
        y
    }

    /// Issue a token on `g` (through weftctl) and start the proxy against `zone`; waits for
    /// `/ready`.
    pub async fn start(self, g: &Global, zone: &Zone) -> anyhow::Result<Dataplane> {
        let dir = tempfile::tempdir()?;
        let token = ok(g.weftctl(&[
            "generate",
            "dataplane-token",
            "--mesh",
            &self.mesh,
            "--name",
            &self.name,
            "--service",
            &self.service,
            "--valid-for",
            "24h",
        ]));
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token.trim())?;
        let dp_file = dir.path().join("dataplane.yaml");
        std::fs::write(&dp_file, self.yaml())?;
        let admin_port = free_port();
        let mut args = vec![
            "run".to_string(),
            "--zone-address".into(),
            format!("https://{}", zone.dataplane_address()),
            "--zone-ca-file".into(),
            zone.dataplane_ca_file().display().to_string(),
            "--dataplane-file".into(),
            dp_file.display().to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--admin-address".into(),
            format!("127.0.0.1:{admin_port}"),
        ];
        args.extend(self.args.clone());
        let mut dp = Dataplane {
            proc: Proc::new(format!("weft-dp {}", self.name), dir.path().join("dp.log")),
            name: self.name,
            admin_port,
            inbound: self.inbound,
            args,
            dir,
        };
        dp.spawn()?;
        dp.wait_ready(Duration::from_secs(30)).await?;
        Ok(dp)
    }
}

/// A running `weft-dp`.
pub struct Dataplane {
    /// First: the log is printed on drop, before the dir holding it is removed.
    proc: Proc,
    pub name: String,
    pub admin_port: u16,
    pub inbound: Option<InboundSpec>,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Dataplane {
    pub fn builder(name: &str, service: &str) -> Builder {
        Builder {
            name: name.to_string(),
            mesh: "default".to_string(),
            service: service.to_string(),
            inbound: None,
            outbounds: Vec::new(),
            args: Vec::new(),
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("weft-dp"));
        cmd.args(&self.args);
        self.proc.spawn(cmd)
    }

    /// Start it again with the same flags (after [`Dataplane::kill9`]); waits for `/ready`.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_ready(Duration::from_secs(30)).await
    }

    pub fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The sidecar's inbound address (what other proxies connect to).
    pub fn inbound_address(&self) -> SocketAddr {
        let port = self.inbound.as_ref().expect("an inbound").port;
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Wait for `GET /ready` = 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let (what, admin) = (format!("weft-dp {}", self.name), self.admin());
        wait_admin_ready(&mut self.proc, &what, &admin, timeout).await
    }

    /// `GET /config`.
    pub async fn config(&self) -> anyhow::Result<Value> {
        get_json(&format!("{}/config", self.admin())).await
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        get_text(&format!("{}/metrics", self.admin())).await
    }

    /// The serial of the certificate the proxy uses now (from `/config`).
    pub async fn cert_serial(&self) -> anyhow::Result<String> {
        let c = self.config().await?;
        c["certificate"]["serial"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no certificate.serial in /config: {c}"))
    }

    /// The endpoints the proxy has for `service` (from `/config`), as `address:port`.
    pub async fn endpoints(&self, service: &str) -> anyhow::Result<Vec<String>> {
        let c = self.config().await?;
        Ok(c["services"][service]["endpoints"]
            .as_array()
            .map(|eps| {
                eps.iter()
                    .map(|e| format!("{}:{}", e["address"].as_str().unwrap_or(""), e["port"]))
                    .collect()
            })
            .unwrap_or_default())
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// SIGTERM; the caller waits for the exit with [`Dataplane::wait_exit`].
    pub fn terminate(&self) {
        if let Some(pid) = self.proc.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Wait for the process to exit; its status.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.proc.exited()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("weft-dp {} still running after {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}

/// A small HTTP/1.1 application: answers every request with `name` and the
/// `x-forwarded-client-cert` it received in the `x-seen-xfcc` response header, and counts
/// requests.
pub struct App {
    pub name: String,
    pub port: u16,
    pub hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl App {
    pub async fn http(name: &str) -> anyhow::Result<App> {
        use axum::http::HeaderMap;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let hits = Arc::new(AtomicU64::new(0));
        let (n, h) = (name.to_string(), hits.clone());
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap| {
            let (n, h) = (n.clone(), h.clone());
            async move {
                h.fetch_add(1, Ordering::Relaxed);
                // `/sleep/<ms>`: answer that much later (timeouts).
                if let Some(ms) = uri
                    .path()
                    .strip_prefix("/sleep/")
                    .and_then(|ms| ms.parse::<u64>().ok())
                {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let xfcc = headers
                    .get("x-forwarded-client-cert")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                ([("x-seen-xfcc", xfcc)], n)
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(App {
            name: name.to_string(),
            port,
            hits,
            task,
        })
    }

    /// A TCP echo server.
    pub async fn tcp_echo(name: &str) -> anyhow::Result<App> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                h.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(App {
            name: name.to_string(),
            port,
            hits,
            task,
        })
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stop serving (new connections are refused).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Requests sent in a loop by `workers` tasks until stopped, counting outcomes.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// GET `url` continuously from `workers` keep-alive clients, each pausing `pause` between
    /// requests. A request fails unless it gets a 200.
    pub fn start(url: &str, workers: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, ok, failed, errors) =
                    (stop.clone(), ok.clone(), failed.clone(), errors.clone());
                let url = url.to_string();
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client");
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let outcome = match http.get(&url).send().await {
                            Ok(r) if r.status().is_success() => r
                                .bytes()
                                .await
                                .map(|_| ())
                                .map_err(|e| format!("reading the body: {e:?}")),
                            Ok(r) => {
                                let status = r.status();
                                Err(format!("{status}: {}", r.text().await.unwrap_or_default()))
                            }
                            Err(e) => Err(format!("{e:?}")),
                        };
                        match outcome {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                let mut errs = errors.lock().unwrap();
                                if errs.len() < 20 {
                                    errs.push(e);
                                }
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            errors,
            tasks,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The first errors seen (up to 20).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Stop and wait for the workers; (ok, failed).
    pub async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let counts = (self.ok.clone(), self.failed.clone());
        for t in self.tasks {
            let _ = t.await;
        }
        (
            counts.0.load(Ordering::Relaxed),
            counts.1.load(Ordering::Relaxed),
        )
    }
}
