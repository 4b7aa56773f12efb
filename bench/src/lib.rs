//! Shared pieces of the proxy benchmark (issue 4): the child processes it starts and what
//! `/proc` says about them, the mesh certificates (made with `weft_core::pki`, as global and
//! the zone make them), and the rustls configurations of the floor tunnel.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use weft_core::pki::{self, SpiffeId};

/// The mesh the benchmark's certificates belong to.
pub const MESH: &str = "bench";

/// A workload identity written to disk: `<dir>/<service>.{chain,key,crt}.pem` and the
/// mesh root `<dir>/root.pem`.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    pub service: String,
    /// Workload certificate then the intermediate, PEM.
    pub chain: PathBuf,
    /// The workload's PKCS#8 key, PEM.
    pub key: PathBuf,
    /// Chain then key in one file (HAProxy's `crt`).
    pub combined: PathBuf,
    /// The mesh root (what peers verify against).
    pub root: PathBuf,
}

/// Make a mesh root, a zone intermediate signed from a CSR, and one workload certificate per
/// service (`spiffe://bench/<service>`), as weft's global and zone do; write them to `dir`.
pub fn make_identities(dir: &Path, services: &[&str]) -> anyhow::Result<Vec<IdentityFiles>> {
    let day = Duration::from_secs(86_400);
    let root = pki::RootCa::generate(MESH, 30 * day)?;
    let zone_key = pki::new_key()?;
    let csr = pki::intermediate_csr(MESH, "bench-zone", &zone_key)?;
    let inter_pem = root.sign_intermediate(&csr, "bench-zone", 7 * day)?;
    let inter = pki::IntermediateCa::from_pem(&inter_pem, &zone_key, root.cert_pem())?;
    let root_path = dir.join("root.pem");
    std::fs::write(&root_path, root.cert_pem())?;
    let mut out = Vec::new();
    for service in services {
        let key = pki::new_key()?;
        let csr = pki::workload_csr(MESH, service, &key)?;
        let cert = inter.issue_workload(&csr, MESH, service, day, SystemTime::now())?;
        let chain = dir.join(format!("{service}.chain.pem"));
        let key_path = dir.join(format!("{service}.key.pem"));
        let combined = dir.join(format!("{service}.crt.pem"));
        std::fs::write(&chain, &cert.chain_pem)?;
        std::fs::write(&key_path, &key)?;
        let mut both = cert.chain_pem.clone();
        if !both.ends_with('\n') {
            both.push('\n');
        }
        both.push_str(&key);
        std::fs::write(&combined, both)?;
        out.push(IdentityFiles {
            service: service.to_string(),
            chain,
            key: key_path,
            combined,
            root: root_path.clone(),
        });
    }
    Ok(out)
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    Ok(pki::certs_from_pem(&pem)?)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("key {}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The floor tunnel's server side: TLS 1.3 only, a client certificate chaining to the mesh
/// root required.
pub fn tunnel_server_config(
    chain: &Path,
    key: &Path,
    root: &Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_chain(root)? {
        roots.add(c)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_chain(chain)?, read_key(key)?)?;
    Ok(Arc::new(cfg))
}

/// The floor tunnel's client side: TLS 1.3, presents its certificate, accepts only a server
/// whose chain verifies to the mesh root with exactly the SPIFFE ID `expected`.
pub fn tunnel_client_config(
    chain: &Path,
    key: &Path,
    root: &Path,
    expected: SpiffeId,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let root = read_chain(root)?
        .into_iter()
        .next()
        .context("no root certificate")?;
    let verifier = SpiffeVerifier {
        root,
        expected,
        provider: provider(),
    };
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(read_chain(chain)?, read_key(key)?)?;
    Ok(Arc::new(cfg))
}

/// Server verification by SPIFFE ID (workload certificates carry no DNS name):
/// `pki::verify_workload` then an exact match on the identity.
#[derive(Debug)]
struct SpiffeVerifier {
    root: CertificateDer<'static>,
    expected: SpiffeId,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let id = pki::verify_workload(&chain, &self.root, SystemTime::now())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "server is {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process of the benchmark, its output appended to a log file; `kill -9` on drop.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Proc> {
        let f = OpenOptions::new().create(true).append(true).open(&log)?;
        cmd.stdout(Stdio::from(f.try_clone()?))
            .stderr(Stdio::from(f))
            .stdin(Stdio::null())
            .env("NO_COLOR", "1");
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.to_string(),
            log,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited with {status}; log {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `utime + stime` of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start with field 3, `state`.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// VmRSS of a process, KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
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

/// Fields of `/proc/<pid>/status` (the number before the unit: KiB for `Vm*`/`Rss*`, a count
/// for `Threads`); keys that are missing are left out.
pub fn status_fields(pid: u32, keys: &[&str]) -> anyhow::Result<Vec<(String, u64)>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut out = Vec::new();
    for key in keys {
        let prefix = format!("{key}:");
        if let Some(v) = status
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
        {
            out.push((key.to_string(), v));
        }
    }
    Ok(out)
}

/// Where a process's resident memory is, from `/proc/<pid>/smaps`: Rss (KiB) summed per
/// mapping name (a file's path, `[heap]`, `[stack]`, or `[anon]` for unnamed mappings), the
/// largest first.
pub fn rss_by_mapping(pid: u32) -> anyhow::Result<Vec<(String, u64)>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    let mut current = String::new();
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        let Some(first) = parts.next() else { continue };
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping header: address perms offset dev inode [name]
            let name = line.split_whitespace().nth(5).unwrap_or("[anon]");
            current = name.to_string();
        } else if first == "Rss:" {
            let kib: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *by.entry(current.clone()).or_default() += kib;
        }
    }
    let mut v: Vec<(String, u64)> = by.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|(_, kib)| std::cmp::Reverse(*kib));
    Ok(v)
}

/// A binary next to the running one (`target/<profile>/<name>`), or an error saying how to
/// build it.
pub fn sibling_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("exe dir")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built (cargo build --release --bins)",
            path.display()
        );
    }
    Ok(path)
}
