//! Real `weft-ingress` processes: a zone token with scope `ingress` issued on global through
//! `weftctl`, registration with the zone's data-plane API, the admin API (`/ready`,
//! `/config`, `/metrics`), kill -9.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{Global, Proc, Zone, bin, free_port, get_json, get_text, ok, wait_admin_ready};

/// A running `weft-ingress --mode ingress`.
pub struct Ingress {
    /// First: the log is printed on drop, before the dir holding it is removed.
    proc: Proc,
    pub name: String,
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Ingress {
    /// Issue an ingress-scoped zone token for `zone` on `g` and start ingress `name` on a free
    /// loopback port; waits for `/ready`.
    pub async fn start(g: &Global, zone: &Zone, name: &str) -> anyhow::Result<Ingress> {
        Ingress::start_mode(g, zone, name, "ingress", &[]).await
    }

    /// Start `weft-ingress --mode <mode>` (`ingress` or `egress`, which is also the zone
    /// token's scope) with `extra` flags; waits for `/ready`.
    pub async fn start_mode(
        g: &Global,
        zone: &Zone,
        name: &str,
        mode: &str,
        extra: &[String],
    ) -> anyhow::Result<Ingress> {
        let dir = tempfile::tempdir()?;
        let token = ok(g.weftctl(&[
            "generate",
            "zone-token",
            "--zone",
            &zone.name,
            "--scope",
            mode,
            "--valid-for",
            "24h",
        ]));
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token.trim())?;
        let (port, admin_port) = (free_port(), free_port());
        let mut args = vec![
            "run".to_string(),
            "--mode".into(),
            mode.into(),
            "--zone-address".into(),
            format!("https://{}", zone.dataplane_address()),
            "--zone-ca-file".into(),
            zone.dataplane_ca_file().display().to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--name".into(),
            name.to_string(),
            "--address".into(),
            format!("127.0.0.1:{port}"),
            "--admin-address".into(),
            format!("127.0.0.1:{admin_port}"),
        ];
        args.extend(extra.iter().cloned());
        let mut ing = Ingress {
            proc: Proc::new(
                format!("weft-ingress --mode {mode} {name}"),
                dir.path().join("ingress.log"),
            ),
            name: name.to_string(),
            port,
            admin_port,
            dir,
            args,
        };
        ing.spawn()?;
        ing.wait_ready(Duration::from_secs(30)).await?;
        Ok(ing)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("weft-ingress"));
        cmd.args(&self.args);
        self.proc.spawn(cmd)
    }

    /// Start it again with the same flags (after [`Ingress::kill9`]).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_ready(Duration::from_secs(30)).await
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// Wait for `GET /ready` = 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let (what, admin) = (format!("weft-ingress {}", self.name), self.admin());
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

    /// The value of the first metric line starting with `series` (name and labels), if any.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics().await.ok()?;
        crate::api::metric_value(&text, series)
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}
