//! A real `weft-zone` process joined to a global: its flags, readiness, kill -9 and restart
//! (same ports and flags; the memory store makes a restart start empty), its API and
//! `/metrics`, and its log (dumped when a test fails).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{Api, Global, Proc, bin, client, free_port, weftctl};

/// What the zone's token file holds.
#[derive(Clone, Debug)]
enum Token {
    /// This text (possibly empty).
    Text(String),
    /// No file at all.
    Missing,
}

/// How to start a zone: `Zone::builder("a").global(&g).token(&t).start()`.
pub struct Builder {
    name: String,
    addresses: Vec<String>,
    ca: Option<PathBuf>,
    fingerprint: Option<String>,
    token: Token,
    args: Vec<String>,
}

impl Builder {
    /// Join this global: dial its KDS address (after any given before), trust its CA file.
    pub fn global(mut self, g: &Global) -> Builder {
        self.addresses.push(g.kds_address());
        if self.ca.is_none() && self.fingerprint.is_none() {
            self.ca = Some(g.ca_file());
        }
        self
    }

    /// Dial this KDS address too (e.g. a proxy in front of global), in this order.
    pub fn address(mut self, address: impl Into<String>) -> Builder {
        self.addresses.push(address.into());
        self
    }

    /// Trust global by its CA file.
    pub fn ca_file(mut self, path: PathBuf) -> Builder {
        self.ca = Some(path);
        self.fingerprint = None;
        self
    }

    /// Trust global by a pinned CA fingerprint instead of its CA file.
    pub fn fingerprint(mut self, fp: impl Into<String>) -> Builder {
        self.fingerprint = Some(fp.into());
        self.ca = None;
        self
    }

    /// The token to write to the zone's token file.
    pub fn token(mut self, token: &str) -> Builder {
        self.token = Token::Text(token.to_string());
        self
    }

    /// Point `--zone-token-file` at a file that does not exist.
    pub fn missing_token_file(mut self) -> Builder {
        self.token = Token::Missing;
        self
    }

    /// Extra `weft-zone run` flags, e.g. `--kds-stall-timeout 3s`.
    pub fn args(mut self, args: &[&str]) -> Builder {
        self.args.extend(args.iter().map(ToString::to_string));
        self
    }

    pub async fn start(self) -> anyhow::Result<Zone> {
        let data_dir = tempfile::tempdir()?;
        let token_file = data_dir.path().join("zone-token");
        let dataplane_port = free_port();
        if let Token::Text(t) = &self.token {
            std::fs::write(&token_file, t)?;
        }
        let mut args = vec![
            "run".to_string(),
            "--zone".to_string(),
            self.name.clone(),
            "--api-address".to_string(),
            format!("127.0.0.1:{}", free_port()),
            "--data-dir".to_string(),
            data_dir.path().display().to_string(),
            "--dataplane-address".to_string(),
            format!("127.0.0.1:{dataplane_port}"),
        ];
        if !self.addresses.is_empty() {
            args.extend([
                "--global-address".to_string(),
                self.addresses.join(","),
                "--zone-token-file".to_string(),
                token_file.display().to_string(),
            ]);
            // A copy of the CA: the zone must not depend on global's data dir living on.
            if let Some(ca) = &self.ca {
                let copy = data_dir.path().join("global-ca.pem");
                std::fs::copy(ca, &copy)
                    .with_context(|| format!("copying global's CA {}", ca.display()))?;
                args.extend(["--global-ca-file".to_string(), copy.display().to_string()]);
            }
            if let Some(fp) = &self.fingerprint {
                args.extend(["--global-fingerprint".to_string(), fp.clone()]);
            }
        }
        args.extend(self.args);
        let api_port = args[4]
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("api port");
        let proc = Proc::new(
            format!("weft-zone {}", self.name),
            data_dir.path().join("zone.log"),
        );
        let mut z = Zone {
            name: self.name,
            api_port,
            dataplane_port,
            proc,
            token_file,
            data_dir,
            args,
            admin_token: String::new(),
        };
        z.spawn().await?;
        Ok(z)
    }
}

/// A running `weft-zone` process.
pub struct Zone {
    /// First: the log is printed on drop, before the data dir holding it is removed.
    proc: Proc,
    pub name: String,
    pub api_port: u16,
    pub dataplane_port: u16,
    pub data_dir: tempfile::TempDir,
    /// The file `--zone-token-file` names (it may not exist).
    pub token_file: PathBuf,
    args: Vec<String>,
    /// The zone's admin API token (new on every start: the store is in memory).
    pub admin_token: String,
}

impl Zone {
    pub fn builder(name: &str) -> Builder {
        Builder {
            name: name.to_string(),
            addresses: Vec::new(),
            ca: None,
            fingerprint: None,
            token: Token::Missing,
            args: Vec::new(),
        }
    }

    /// A zone joined to `g` with a fresh token for its name.
    pub async fn join(name: &str, g: &Global, args: &[&str]) -> anyhow::Result<Zone> {
        let token = g.zone_token(name, "1h").await?;
        Zone::builder(name)
            .global(g)
            .token(&token.token)
            .args(args)
            .start()
            .await
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// Where proxies connect (the data-plane API, TLS).
    pub fn dataplane_address(&self) -> String {
        format!("127.0.0.1:{}", self.dataplane_port)
    }

    /// The CA proxies verify the data-plane API with (`--zone-ca-file`).
    pub fn dataplane_ca_file(&self) -> PathBuf {
        self.data_dir.path().join("dataplane-ca.pem")
    }

    /// The zone's REST API with its admin token.
    pub fn api(&self) -> Api {
        Api::new(self.url(), self.admin_token.clone())
    }

    /// Replace the token file's content (the zone reads it on every connection attempt).
    pub fn set_token(&self, token: &str) -> anyhow::Result<()> {
        Ok(std::fs::write(&self.token_file, token)?)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        // The zone writes a new admin token on every start: wait for that one.
        let token_path = self.data_dir.path().join("admin-token");
        let _ = std::fs::remove_file(&token_path);
        let mut cmd = Command::new(bin("weft-zone"));
        cmd.args(&self.args);
        self.proc.spawn(cmd)?;
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.proc.exited()? {
                bail!(
                    "weft-zone {} exited with {status} while starting:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if let Ok(r) = http.get(format!("{}/readyz", self.url())).send().await
                && r.status().is_success()
                && let Ok(token) = std::fs::read_to_string(&token_path)
                && !token.trim().is_empty()
            {
                self.admin_token = token.trim().to_string();
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "weft-zone {} not ready after 30s:\n{}",
                    self.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: no graceful shutdown.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Start again with the same ports and flags; the memory store starts empty.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// Run `weftctl` against this zone's API.
    pub fn weftctl(&self, args: &[&str]) -> Output {
        weftctl(&self.url(), &self.admin_token, self.data_dir.path(), args)
    }

    /// A series of the zone's `/metrics` (e.g. `weft_kds_reconnects_total`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        self.api().metric(series).await.ok().flatten()
    }

    /// Whether the zone reports itself connected to global (`weft_kds_connected`).
    pub async fn connected(&self) -> Option<bool> {
        self.metric("weft_kds_connected").await.map(|v| v == 1.0)
    }

    /// Wait until the zone's log contains `needle`; returns the first line with it.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {needle:?} in zone {}'s log:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until the zone holds an intermediate CA for `mesh` (`GET /_identity/meshes`).
    pub async fn wait_mesh_ca(&self, mesh: &str, timeout: Duration) {
        crate::eventually(
            &format!("zone {} has an intermediate CA for mesh {mesh}", self.name),
            timeout,
            || async {
                let list = self.api().get("/_identity/meshes").await.ok()??;
                list["items"]
                    .as_array()?
                    .iter()
                    .any(|m| m["mesh"] == mesh)
                    .then_some(())
            },
        )
        .await;
    }

    /// Wait until the zone reports both streams reconciled (`weft_kds_synced` = 1 on both).
    pub async fn wait_synced(&self, timeout: Duration) {
        crate::eventually(
            &format!("zone {} connected and synced", self.name),
            timeout,
            || async {
                let text = client()
                    .get(format!("{}/metrics", self.url()))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                let v = |s: &str| crate::api::metric_value(&text, s);
                (v("weft_kds_connected") == Some(1.0)
                    && v("weft_kds_synced{direction=\"global_to_zone\"}") == Some(1.0)
                    && v("weft_kds_synced{direction=\"zone_to_global\"}") == Some(1.0))
                .then_some(())
            },
        )
        .await
    }
}
