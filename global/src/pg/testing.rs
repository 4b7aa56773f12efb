//! Test support: a fresh database per test on a shared PostgreSQL ([`TestDb`], [`TestStore`]),
//! and a throwaway PostgreSQL server of a test's own that it may stop and restart
//! ([`TempServer`]).
//!
//! The shared server's admin URL comes from `WEFT_TEST_POSTGRES_URL` (default
//! [`DEFAULT_URL`]). A test that cannot reach it fails, with a message saying how to start it:
//! tests never skip silently.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_core::store::{self, Count, Event, ListQuery, Outcome, Page, Result};
use weft_core::{Key, Resource};

use super::{Store, migrate, pool_options, redact};

/// The environment variable naming the admin URL of the PostgreSQL server tests use.
pub const URL_ENV: &str = "WEFT_TEST_POSTGRES_URL";
/// The admin URL when [`URL_ENV`] is not set (what `.ci/postgres.sh` sets up).
pub const DEFAULT_URL: &str = "postgres://weft:weft@127.0.0.1:5432/postgres";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin URL of the shared test server.
pub fn admin_url() -> String {
    std::env::var(URL_ENV)
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// `url` pointing at database `db` instead (query parameters kept).
pub fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let host_start = base
        .find("://")
        .map(|i| i + 3)
        .with_context(|| format!("{}: not a URL", redact(url)))?;
    let path_start = base[host_start..]
        .find('/')
        .map_or(base.len(), |i| i + host_start);
    let mut out = format!("{}/{db}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

async fn admin_connect(admin_url: &str) -> anyhow::Result<PgConnection> {
    let hint = || {
        format!(
            "cannot reach the test PostgreSQL at {} (start it with `bash .ci/postgres.sh`, or set {URL_ENV})",
            redact(admin_url)
        )
    };
    tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(admin_url))
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {CONNECT_TIMEOUT:?}"))
        .with_context(hint)?
        .with_context(hint)
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = admin_connect(admin_url).await?;
    sqlx::query(AssertSqlSafe(format!(
        r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
    )))
    .execute(&mut conn)
    .await
    .with_context(|| format!("drop test database {name}"))?;
    conn.close().await.ok();
    Ok(())
}

/// A fresh, empty database `weft_test_<random>` on the shared test server, dropped (best
/// effort) on [`cleanup`](TestDb::cleanup) or drop.
pub struct TestDb {
    admin_url: String,
    name: String,
    url: String,
    dropped: bool,
}

impl TestDb {
    /// Create a database on the server of `WEFT_TEST_POSTGRES_URL`.
    pub async fn create() -> anyhow::Result<TestDb> {
        TestDb::create_on(&admin_url()).await
    }

    /// Create a database on the server of `admin_url` (a role with CREATEDB).
    pub async fn create_on(admin_url: &str) -> anyhow::Result<TestDb> {
        let name = format!("weft_test_{:016x}", rand::random::<u64>());
        let url = with_database(admin_url, &name)?;
        let mut conn = admin_connect(admin_url).await?;
        sqlx::query(AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .execute(&mut conn)
            .await
            .with_context(|| format!("create test database {name} on {}", redact(admin_url)))?;
        conn.close().await.ok();
        Ok(TestDb {
            admin_url: admin_url.to_string(),
            name,
            url,
            dropped: false,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A pool on this database, with the store's [`pool_options`], migrated.
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        let pool = pool_options()
            .connect(&self.url)
            .await
            .with_context(|| format!("connect to {}", self.name))?;
        migrate(&pool).await?;
        Ok(pool)
    }

    /// A store on this database (migrated), stopped by `shutdown` or by drop.
    pub async fn store(&self, shutdown: CancellationToken) -> anyhow::Result<Store> {
        Ok(Store::new(self.pool().await?, shutdown).await?)
    }

    /// Drop the database now.
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        self.dropped = true;
        drop_database(&self.admin_url, &self.name).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop may run inside or outside a runtime: use a runtime of our own on a thread.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(drop_database(&admin_url, &name))
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: {e:#}"),
            Err(_) => eprintln!("warning: dropping test database {} panicked", self.name),
        }
    }
}

/// A [`Store`] on its own [`TestDb`], which lives as long as the store: what the conformance
/// suite and end-to-end tests need. Derefs to the [`Store`].
pub struct TestStore {
    // Field order is drop order: the store (and its listener) before the database.
    store: Store,
    db: TestDb,
}

impl TestStore {
    pub async fn create() -> anyhow::Result<TestStore> {
        let db = TestDb::create().await?;
        let store = db.store(CancellationToken::new()).await?;
        Ok(TestStore { store, db })
    }

    pub fn db(&self) -> &TestDb {
        &self.db
    }
}

impl Deref for TestStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

#[async_trait]
impl store::Store for TestStore {
    async fn get(&self, key: &Key) -> Result<Option<Resource>> {
        self.store.get(key).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Page> {
        self.store.list(query).await
    }
    async fn create(&self, resource: Resource) -> Result<Resource> {
        self.store.create(resource).await
    }
    async fn update(&self, resource: Resource, expected_version: u64) -> Result<Resource> {
        self.store.update(resource, expected_version).await
    }
    async fn delete(&self, key: &Key, expected_version: Option<u64>) -> Result<()> {
        self.store.delete(key, expected_version).await
    }
    async fn apply(&self, resources: Vec<Resource>, dry_run: bool) -> Result<Vec<Outcome>> {
        self.store.apply(resources, dry_run).await
    }
    async fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        self.store.events_since(since, limit).await
    }
    async fn revision(&self) -> Result<u64> {
        self.store.revision().await
    }
    fn watch(&self) -> watch::Receiver<u64> {
        self.store.watch()
    }
    async fn counts(&self) -> Result<Vec<Count>> {
        self.store.counts().await
    }
    async fn system_get(&self, key: &str) -> Result<Option<String>> {
        self.store.system_get(key).await
    }
    async fn system_init(&self, key: &str, value: &str) -> Result<String> {
        self.store.system_init(key, value).await
    }
    async fn system_set(&self, key: &str, value: &str) -> Result<()> {
        self.store.system_set(key, value).await
    }
    async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }
}

/// A throwaway PostgreSQL server in a temporary directory, on a free loopback port, with
/// `trust` authentication for user `postgres`. As root, its programs run as the `postgres`
/// OS user (PostgreSQL refuses to run as root). Drop stops it and removes the directory.
pub struct TempServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl TempServer {
    /// Initialize a new cluster and start it.
    pub async fn create() -> anyhow::Result<TempServer> {
        let bin = pg_bin_dir()?;
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!("weft-pg-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        let server = TempServer {
            dir,
            bin,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            let status = tokio::process::Command::new("chown")
                .arg("postgres:postgres")
                .arg(&server.dir)
                .status()
                .await
                .context("run chown")?;
            if !status.success() {
                bail!("chown postgres {}: {status}", server.dir.display());
            }
        }
        let data = server.data_dir();
        server
            .pg(
                "initdb",
                &[
                    "-D",
                    path_str(&data)?,
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
            )
            .await?;
        server.start().await?;
        Ok(server)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Start the server (again) on the same port; returns when it accepts connections.
    pub async fn start(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            self.port,
            path_str(&self.dir)?
        );
        let log = self.dir.join("postgres.log");
        self.pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data_dir())?,
                "-l",
                path_str(&log)?,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .await
    }

    /// Stop the server (fast shutdown: clients are disconnected).
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data_dir())?,
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "stop",
            ],
        )
        .await
    }

    /// Stop and start again.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await?;
        self.start().await
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> std::process::Command {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        };
        cmd.current_dir(&self.dir);
        cmd
    }

    async fn pg(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = tokio::process::Command::from(self.command(program));
        let out = cmd
            .args(args)
            .output()
            .await
            .with_context(|| format!("run {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {}: {}\n{}{}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        Ok(())
    }
}

impl Drop for TempServer {
    fn drop(&mut self) {
        if let Ok(data) = path_str(&self.data_dir()) {
            let _ = self
                .command("pg_ctl")
                .args(["-D", data, "-m", "immediate", "-w", "-t", "30", "stop"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{}: not UTF-8", p.display()))
}

/// `/usr/lib/postgresql/<newest version>/bin`.
fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .with_context(|| {
            format!(
                "{}: PostgreSQL is not installed (run `bash .ci/postgres.sh`)",
                root.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|v| v.parse::<u32>().ok()))
        .max()
        .with_context(|| format!("no PostgreSQL version under {}", root.display()))?;
    Ok(root.join(newest.to_string()).join("bin"))
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A free TCP port on 127.0.0.1 for another process to bind.
///
/// Ports come from below the kernel's ephemeral range, so no outgoing connection (a pool's
/// connection to Postgres, a client's) can take one between this call and the child's bind,
/// and this process never hands the same port out twice, so parallel tests don't collide.
/// Test binaries start at different offsets (by pid) so concurrent ones spread out too.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const FIRST: u32 = 10_000;
    if ephemeral_low < FIRST + 1_000 {
        // An unusual range: fall back to what the kernel picks.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind a free port on 127.0.0.1");
    }
    let span = ephemeral_low - FIRST;
    let offset = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + offset.wrapping_add(n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {FIRST} and {ephemeral_low}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_the_path() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres", "x").unwrap(),
            "postgres://u:p@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://h", "x").unwrap(),
            "postgres://h/x"
        );
        assert_eq!(
            with_database("postgres://h/db?sslmode=disable", "x").unwrap(),
            "postgres://h/x?sslmode=disable"
        );
        assert!(with_database("nope", "x").is_err());
    }
}
