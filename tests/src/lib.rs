//! The end-to-end harness: start the real `weft-global` binary (and later zones and
//! proxies) on loopback against real PostgreSQL, drive it with the real `weftctl`, and dump
//! every process's log when a test fails.

pub mod fixtures;

use std::io::Read as _;
use std::net::TcpListener;
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

/// A free TCP port on 127.0.0.1 (bound and released; good enough on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// A running `weft-global` process on its own port and data dir.
pub struct Global {
    pub port: u16,
    /// Where zones connect (KDS).
    pub kds_port: u16,
    pub backend: Backend,
    pub data_dir: tempfile::TempDir,
    log: PathBuf,
    child: Option<Child>,
    pub admin_token: String,
}

impl Global {
    pub async fn start(backend: Backend) -> anyhow::Result<Global> {
        let data_dir = tempfile::tempdir()?;
        let log = data_dir.path().join("global.log");
        let mut g = Global {
            port: free_port(),
            kds_port: free_port(),
            backend,
            log,
            data_dir,
            child: None,
            admin_token: String::new(),
        };
        g.spawn().await?;
        Ok(g)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        cmd.stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .env("WEFT_LOG", "info");
        self.child = Some(cmd.spawn().context("starting weft-global")?);
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port, data dir and backend.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
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

impl Drop for Global {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- weft-global log ({}) ----\n{}",
                self.log.display(),
                self.logs()
            );
        }
    }
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
