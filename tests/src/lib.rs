//! The end-to-end harness: start the real `weft-global` and `weft-zone` binaries on loopback
//! against real PostgreSQL, drive them with the real `weftctl` and their REST APIs, put
//! proxies between them, and dump every process's log when a test fails.

pub mod api;
pub mod dp;
pub mod egress;
pub mod fixtures;
pub mod ingress;
pub mod netns;
pub mod proxy;
pub mod zone;

pub use api::Api;
pub use zone::Zone;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Path of a workspace binary, built next to the test executable by `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>  or  target/<profile>/<bin>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo test --workspace` (or `cargo build --bins` first)",
        path.display()
    );
    path
}

pub use weft_global::pg::testing::free_port;

/// Wait until `GET {admin}/ready` answers 200 (the admin endpoint of a weft-dp or
/// weft-ingress run by `proc`); fail with `what`'s log if it exits or `timeout` passes.
pub async fn wait_admin_ready(
    proc: &mut Proc,
    what: &str,
    admin: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let http = client();
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        if let Some(status) = proc.exited()? {
            bail!(
                "{what} exited with {status} while starting:\n{}",
                proc.logs()
            );
        }
        match http.get(format!("{admin}/ready")).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!(
                "{what} not ready after {timeout:?} (last: {last}):\n{}",
                proc.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET url`, its body as JSON (an error for a non-2xx status).
pub async fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    Ok(client()
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// `GET url`, its body as text (an error for a non-2xx status).
pub async fn get_text(url: &str) -> anyhow::Result<String> {
    Ok(client()
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// Poll `f` until it returns `Some`, or fail after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a global is backed.
#[derive(Clone, Debug)]
pub enum Backend {
    Memory,
    Postgres(String),
}

/// A running `weft-global` process on its own ports and data dir.
pub struct Global {
    /// First: fields drop in order, and the process's log must be printed before the data
    /// dir holding it is removed.
    proc: Proc,
    pub port: u16,
    /// Where zones connect (KDS).
    pub kds_port: u16,
    pub backend: Backend,
    pub data_dir: tempfile::TempDir,
    pub admin_token: String,
    /// Extra `weft-global run` flags, kept across restarts and given to replicas.
    args: Vec<String>,
}

/// How to start a global: `Global::builder(backend).args(&[..]).start()`.
pub struct GlobalBuilder {
    backend: Backend,
    args: Vec<String>,
    admin_token: Option<String>,
}

impl GlobalBuilder {
    /// Extra flags for `weft-global run`, e.g. `--kds-ping-interval 500ms`.
    pub fn args(mut self, args: &[&str]) -> GlobalBuilder {
        self.args.extend(args.iter().map(ToString::to_string));
        self
    }

    pub async fn start(self) -> anyhow::Result<Global> {
        let data_dir = tempfile::tempdir()?;
        let proc = Proc::new("weft-global", data_dir.path().join("global.log"));
        if let Some(token) = &self.admin_token {
            // A replica on a store another replica made: global writes the token file only
            // on the first start against a store, so hand it the one we know.
            std::fs::write(data_dir.path().join("admin-token"), token)?;
        }
        let mut g = Global {
            port: free_port(),
            kds_port: free_port(),
            backend: self.backend,
            proc,
            data_dir,
            admin_token: String::new(),
            args: self.args,
        };
        g.spawn().await?;
        Ok(g)
    }
}

/// A zone token issued by global (`POST /_tokens/zone`).
#[derive(Clone, Debug)]
pub struct ZoneToken {
    pub token: String,
    pub id: String,
    pub expires_at: String,
}

impl Global {
    pub async fn start(backend: Backend) -> anyhow::Result<Global> {
        Global::builder(backend).start().await
    }

    pub fn builder(backend: Backend) -> GlobalBuilder {
        GlobalBuilder {
            backend,
            args: Vec::new(),
            admin_token: None,
        }
    }

    /// Another replica on the same store (same database, same flags), with its own ports
    /// and data dir. Only meaningful on PostgreSQL.
    pub async fn replica(&self) -> anyhow::Result<Global> {
        GlobalBuilder {
            backend: self.backend.clone(),
            args: self.args.clone(),
            admin_token: Some(self.admin_token.clone()),
        }
        .start()
        .await
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What zones dial: `127.0.0.1:<kds port>`.
    pub fn kds_address(&self) -> String {
        format!("127.0.0.1:{}", self.kds_port)
    }

    /// The CA zones trust, written by global to `<data-dir>/kds-ca.pem` on start.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.path().join("kds-ca.pem")
    }

    /// `sha256:<hex>` of the KDS CA (computed from [`ca_file`](Global::ca_file)).
    pub fn fingerprint(&self) -> anyhow::Result<String> {
        let pem = std::fs::read_to_string(self.ca_file())
            .with_context(|| format!("reading {}", self.ca_file().display()))?;
        weft_global::kds_tls::fingerprint_of_pem(&pem)
    }

    /// The CA fingerprint as global logged it on start (`fingerprint=sha256:...`).
    pub fn logged_fingerprint(&self) -> Option<String> {
        let logs = self.logs();
        let line = logs.lines().rev().find(|l| l.contains("KDS listening"))?;
        let at = line.find("sha256:")?;
        let fp: String = line[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == ':')
            .collect();
        Some(fp)
    }

    /// The REST API with the admin token.
    pub fn api(&self) -> Api {
        Api::new(self.url(), self.admin_token.clone())
    }

    /// Issue a zone token over the API (`POST /_tokens/zone`).
    pub async fn zone_token(&self, zone: &str, valid_for: &str) -> anyhow::Result<ZoneToken> {
        let r = self
            .req(reqwest::Method::POST, "/_tokens/zone")
            .json(&serde_json::json!({"zone": zone, "scope": "zone", "validFor": valid_for}))
            .send()
            .await?;
        let status = r.status();
        let body: serde_json::Value = r.json().await?;
        if !status.is_success() {
            bail!("POST /_tokens/zone: {status}: {body}");
        }
        let field = |k: &str| -> anyhow::Result<String> {
            Ok(body[k]
                .as_str()
                .with_context(|| format!("POST /_tokens/zone: no {k} in {body}"))?
                .to_string())
        };
        Ok(ZoneToken {
            token: field("token")?,
            id: field("id")?,
            expires_at: field("expiresAt")?,
        })
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("weft-global"));
        cmd.arg("run")
            .arg("--api-address")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .arg("--kds-address")
            .arg(format!("127.0.0.1:{}", self.kds_port));
        match &self.backend {
            Backend::Memory => cmd.args(["--store", "memory"]),
            Backend::Postgres(url) => cmd.args(["--store", "postgres", "--postgres-url", url]),
        };
        cmd.args(&self.args);
        self.proc.spawn(cmd)?;
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.proc.exited()? {
                bail!(
                    "weft-global exited with {status} while starting:\n{}",
                    self.logs()
                );
            }
            let token_file = self.data_dir.path().join("admin-token");
            if let Ok(r) = http.get(format!("{}/readyz", self.url())).send().await
                && r.status().is_success()
                && token_file.exists()
            {
                self.admin_token = std::fs::read_to_string(token_file)?.trim().to_string();
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("weft-global not ready after 30s:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: no graceful shutdown, no flush.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Start again on the same ports, data dir, backend and flags.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// An authenticated request to the API.
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        client()
            .request(method, format!("{}{path}", self.url()))
            .bearer_auth(&self.admin_token)
    }

    /// Run `weftctl` against this global (address and token by environment, config in the
    /// data dir).
    pub fn weftctl(&self, args: &[&str]) -> Output {
        weftctl(&self.url(), &self.admin_token, self.data_dir.path(), args)
    }
}

/// One child process of a test, its stdout and stderr appended to a log file. `kill -9`
/// on drop; the log is printed when the test is failing.
pub struct Proc {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn new(name: impl Into<String>, log: PathBuf) -> Proc {
        Proc {
            name: name.into(),
            log,
            child: None,
        }
    }

    /// Start `cmd` with its output going to the log (plain text, info level).
    pub fn spawn(&mut self, mut cmd: Command) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        cmd.stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .env("WEFT_LOG", "info")
            .env("NO_COLOR", "1");
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", self.name))?,
        );
        Ok(())
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(match self.child.as_mut() {
            Some(c) => c.try_wait()?,
            None => None,
        })
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`: no graceful shutdown, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}) ----\n{}",
                self.name,
                self.log.display(),
                self.logs()
            );
        }
    }
}

/// A process's log file as text (empty if it cannot be read).
pub fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client")
}

/// Run the weftctl binary with an address, token and a private config file.
pub fn weftctl(address: &str, token: &str, dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("weftctl"))
        .args(args)
        .env("WEFTCTL_ADDRESS", address)
        .env("WEFTCTL_TOKEN", token)
        .env("WEFTCTL_CONFIG", dir.join("weftctl.yaml"))
        .output()
        .expect("running weftctl")
}

/// stdout of a successful command, or a panic with everything it printed.
pub fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
