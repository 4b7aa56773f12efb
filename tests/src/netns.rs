//! A network namespace for a test, joined to the host by a veth pair (`10.231.N.1/30` on the
//! host side, `10.231.N.2/30` inside, `lo` up), with its own `/etc/netns/<name>/resolv.conf`
//! (what `ip netns exec` mounts over `/etc/resolv.conf`); and a TCP relay to make a loopback
//! service of the host reachable from it. Everything is removed on drop, also when the test
//! fails. Needs root (CI runs as root) and `ip` (iproute2).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context as _, bail};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A namespace `weft-t-<pid>` and its veth pair.
pub struct Netns {
    pub name: String,
    /// The host side's address: what the namespace reaches the host at.
    pub host_ip: Ipv4Addr,
    /// The namespace side's address.
    pub ns_ip: Ipv4Addr,
    host_if: String,
    etc: PathBuf,
}

/// Run a command to completion; its output, or an error with everything it printed.
fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> anyhow::Result<Output> {
    run(Command::new("ip").args(args))
}

/// Whether the test runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Netns {
    /// Create the namespace, the veth pair and the addresses; `resolv_conf` becomes the
    /// namespace's `/etc/resolv.conf`.
    pub fn create(resolv_conf: &str) -> anyhow::Result<Netns> {
        if !is_root() {
            bail!(
                "this test needs root: it creates a network namespace, a veth pair and iptables rules (run it as root, as CI does)"
            );
        }
        let pid = std::process::id();
        // 10.231.N.0/30 with N from the pid: distinct for concurrent test processes (mostly).
        let n = (pid % 250) as u8 + 1;
        let ns = Netns {
            name: format!("weft-t-{pid}"),
            host_ip: Ipv4Addr::new(10, 231, n, 1),
            ns_ip: Ipv4Addr::new(10, 231, n, 2),
            host_if: format!("wt{pid}h"),
            etc: PathBuf::from(format!("/etc/netns/weft-t-{pid}")),
        };
        // From here on, Drop cleans up whatever was made.
        std::fs::create_dir_all(&ns.etc)
            .with_context(|| format!("creating {}", ns.etc.display()))?;
        std::fs::write(ns.etc.join("resolv.conf"), resolv_conf)?;
        let ns_if = format!("wt{pid}n");
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| -> anyhow::Result<Output> {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec <name> <program>`: a command that runs inside the namespace (with its
    /// resolv.conf), environment cleared but for `PATH` (so no proxy variables leak in).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .args(["netns", "exec", &self.name])
            .arg(program);
        cmd
    }

    /// Run a shell command line inside the namespace; its stdout, or an error with
    /// everything it printed.
    pub fn sh(&self, line: &str) -> anyhow::Result<String> {
        let out = run(self.command("sh").args(["-ec", line]))?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth pair; delete the host end too in case the
        // namespace was never made.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

/// A TCP relay on `listen` to `upstream`, bytes copied both ways, until dropped.
pub struct Relay {
    pub address: SocketAddr,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("relay: binding {listen}"))?;
        let address = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Ok(Relay { address, task })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
