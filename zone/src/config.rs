//! Typed configuration of weft-zone: command-line flags, `WEFT_ZONE_*` / `WEFT_*` environment
//! variables and an optional YAML file, resolved once at the edge (flags and env win over the
//! file, the file over the defaults).
//!
//! Settings only this binary has use `WEFT_ZONE_*` (so a shell that also runs global does not
//! point both at one data directory); the log format is shared (`WEFT_LOG_FORMAT`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use axum::http::Uri;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
pub use weft_global::config::LogFormat;

#[derive(Parser, Debug)]
#[command(name = "weft-zone", version, about = "weft zone control plane")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the zone control plane.
    Run(RunArgs),
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// YAML config file; flags and environment variables override what it says.
    #[arg(long, env = "WEFT_ZONE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This zone's name, a DNS label (e.g. east). Required.
    #[arg(long = "zone", env = "WEFT_ZONE_NAME")]
    pub zone: Option<String>,
    /// Global's KDS address, e.g. https://global.example.com:5685 (or host:port). Without it
    /// the zone runs standalone.
    #[arg(long, env = "WEFT_ZONE_GLOBAL_ADDRESS")]
    pub global_address: Option<String>,
    /// File holding this zone's token, issued by global. Required with --global-address.
    #[arg(long, env = "WEFT_ZONE_TOKEN_FILE")]
    pub zone_token_file: Option<PathBuf>,
    /// PEM file of the CA that signed global's KDS certificate. This or --global-fingerprint
    /// is required with --global-address.
    #[arg(
        long,
        env = "WEFT_ZONE_GLOBAL_CA_FILE",
        conflicts_with = "global_fingerprint"
    )]
    pub global_ca_file: Option<PathBuf>,
    /// Or pin that CA: sha256:<64 hex digits> of its DER form (global prints it on start).
    #[arg(long, env = "WEFT_ZONE_GLOBAL_FINGERPRINT")]
    pub global_fingerprint: Option<String>,
    /// Address of the REST API [default: 127.0.0.1:5682].
    #[arg(long, env = "WEFT_ZONE_API_ADDRESS")]
    pub api_address: Option<SocketAddr>,
    /// Directory for the generated API tokens [default: ./weft-zone-data].
    #[arg(long, env = "WEFT_ZONE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// How often each KDS stream is pinged [default: 5s].
    #[arg(long, env = "WEFT_ZONE_KDS_PING_INTERVAL")]
    pub kds_ping_interval: Option<weft_core::validate::Duration>,
    /// A KDS stream silent for this long is torn down and reconnected [default: 20s].
    #[arg(long, env = "WEFT_ZONE_KDS_STALL_TIMEOUT")]
    pub kds_stall_timeout: Option<weft_core::validate::Duration>,
    /// Address of the data-plane API (gRPC over TLS) that proxies connect to
    /// [default: 127.0.0.1:5683].
    #[arg(long, env = "WEFT_ZONE_DATAPLANE_ADDRESS")]
    pub dataplane_address: Option<SocketAddr>,
    /// An extra DNS name or IP address for the data-plane API's generated server certificate
    /// (besides localhost, 127.0.0.1 and ::1); repeat the flag or separate with commas.
    #[arg(
        long = "dataplane-san",
        env = "WEFT_ZONE_DATAPLANE_SANS",
        value_delimiter = ','
    )]
    pub dataplane_sans: Vec<String>,
    /// PEM certificate chain for the data-plane API instead of the generated one (with
    /// --dataplane-key-file).
    #[arg(long, env = "WEFT_ZONE_DATAPLANE_CERT_FILE")]
    pub dataplane_cert_file: Option<PathBuf>,
    /// PEM private key of --dataplane-cert-file.
    #[arg(long, env = "WEFT_ZONE_DATAPLANE_KEY_FILE")]
    pub dataplane_key_file: Option<PathBuf>,
    /// Lifetime of the workload certificates issued to proxies when the Mesh does not set
    /// `dpCert.rotation.expiration` [default: 24h].
    #[arg(long, env = "WEFT_ZONE_WORKLOAD_CERT_VALIDITY")]
    pub workload_cert_validity: Option<weft_core::validate::Duration>,
    /// After a start, how long the zone holds the first full update of proxies that reconnect
    /// with a config, so they never see a half-registered mesh [default: 5s; 0s disables].
    #[arg(long, env = "WEFT_ZONE_DATAPLANE_WARMUP")]
    pub dataplane_warmup: Option<weft_core::validate::Duration>,
    /// The IPv4 range the zone allocates mesh VIPs from (`<service>.mesh`,
    /// `<service>.<zone>.mesh`) [default: 127.240.0.0/12].
    #[arg(long, env = "WEFT_ZONE_VIP_CIDR")]
    pub vip_cidr: Option<String>,
    /// How long a VIP whose name no service uses any more keeps its address before it is
    /// released [default: 1h].
    #[arg(long, env = "WEFT_ZONE_VIP_RETENTION")]
    pub vip_retention: Option<weft_core::validate::Duration>,
}

/// The optional YAML file: the same settings as the flags.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    zone: Option<String>,
    global_address: Option<String>,
    zone_token_file: Option<PathBuf>,
    global_ca_file: Option<PathBuf>,
    global_fingerprint: Option<String>,
    api_address: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    kds_ping_interval: Option<weft_core::validate::Duration>,
    kds_stall_timeout: Option<weft_core::validate::Duration>,
    dataplane_address: Option<SocketAddr>,
    dataplane_sans: Option<Vec<String>>,
    dataplane_cert_file: Option<PathBuf>,
    dataplane_key_file: Option<PathBuf>,
    workload_cert_validity: Option<weft_core::validate::Duration>,
    dataplane_warmup: Option<weft_core::validate::Duration>,
    vip_cidr: Option<String>,
    vip_retention: Option<weft_core::validate::Duration>,
}

/// The resolved configuration of `weft-zone run`.
#[derive(Clone, Debug)]
pub struct Config {
    /// This zone's name (a DNS label): stamped as `weft.io/zone` on what it writes.
    pub zone: String,
    /// Where global is; `None`: the zone runs standalone.
    pub global: Option<Global>,
    pub api_address: SocketAddr,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    /// Ping cadence and stall deadline of the KDS streams.
    pub kds_liveness: weft_proto::driver::Liveness,
    /// The data-plane API proxies connect to.
    pub dataplane: Dataplane,
    /// The mesh VIPs.
    pub vip: Vip,
}

/// Settings of the mesh VIPs (`crate::vip`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub cidr: crate::vip::Cidr,
    /// How long an unused name keeps its address.
    pub retention: std::time::Duration,
}

impl Default for Vip {
    fn default() -> Self {
        Vip {
            cidr: crate::vip::DEFAULT_CIDR.parse().expect("valid default"),
            retention: crate::vip::DEFAULT_RETENTION,
        }
    }
}

/// Settings of the data-plane API (`docs/dataplane-api.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataplane {
    pub address: SocketAddr,
    /// Extra names of the generated server certificate.
    pub sans: Vec<String>,
    /// The operator's certificate chain and key files instead of the generated ones.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Workload certificate lifetime when the Mesh does not say.
    pub workload_cert_validity: std::time::Duration,
    /// How long after start reconnecting proxies wait for their first full update.
    pub warmup: std::time::Duration,
}

impl Default for Dataplane {
    fn default() -> Self {
        Dataplane {
            address: "127.0.0.1:5683".parse().expect("valid default"),
            sans: Vec::new(),
            tls_files: None,
            workload_cert_validity: std::time::Duration::from_secs(24 * 3600),
            warmup: std::time::Duration::from_secs(5),
        }
    }
}

/// How to reach global: set together, or not at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    /// Global's KDS address, always `https://host[:port]`: the first of `addresses`.
    pub address: Uri,
    /// Every global replica to try, in order (`--global-address a:5685,b:5685`); the zone
    /// moves to the next when one fails.
    pub addresses: Vec<Uri>,
    /// The file holding the zone token, read when connecting (so a rotated token is picked up).
    pub token_file: PathBuf,
    /// How to check global's certificate.
    pub trust: Trust,
}

/// How the zone checks global's KDS certificate: against the CA that signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The CA certificate (PEM) in this file.
    CaFile(PathBuf),
    /// The CA certificate with this SHA-256 fingerprint (of its DER form), found in the chain
    /// global presents.
    Fingerprint(Fingerprint),
}

/// A SHA-256 certificate fingerprint, written `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Config {
    /// A standalone zone with the defaults: what tests start from.
    pub fn new(zone: impl Into<String>) -> Config {
        Config {
            zone: zone.into(),
            global: None,
            api_address: "127.0.0.1:5682".parse().expect("valid default"),
            data_dir: PathBuf::from("weft-zone-data"),
            log_format: LogFormat::Text,
            kds_liveness: weft_proto::driver::Liveness::default(),
            dataplane: Dataplane::default(),
            vip: Vip::default(),
        }
    }

    /// Resolve flags over the file over the defaults; check what must go together.
    pub fn resolve(args: RunArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => File::default(),
        };
        let dataplane = resolve_dataplane(&args, &file, &crate::config::Dataplane::default())?;
        let vip = Vip {
            cidr: match args.vip_cidr.as_ref().or(file.vip_cidr.as_ref()) {
                Some(c) => c.parse().map_err(anyhow::Error::msg)?,
                None => Vip::default().cidr,
            },
            retention: args
                .vip_retention
                .or(file.vip_retention)
                .map_or(crate::vip::DEFAULT_RETENTION, |d| d.as_std()),
        };
        let Some(zone) = args.zone.or(file.zone) else {
            bail!(
                "--zone is required (or WEFT_ZONE_NAME, or zone in the config file): this zone's name, a DNS label such as east"
            );
        };
        weft_core::validate::check_dns_label(&zone).map_err(|e| anyhow::anyhow!("--zone: {e}"))?;
        // CA file and fingerprint are one choice: a flag's choice replaces the file's.
        let (ca_file, fingerprint) =
            if args.global_ca_file.is_some() || args.global_fingerprint.is_some() {
                (args.global_ca_file, args.global_fingerprint)
            } else {
                (file.global_ca_file, file.global_fingerprint)
            };
        let global = resolve_global(
            args.global_address.or(file.global_address),
            args.zone_token_file.or(file.zone_token_file),
            ca_file,
            fingerprint,
        )?;
        let d = Config::new(zone);
        Ok(Config {
            dataplane,
            vip,
            global,
            api_address: args
                .api_address
                .or(file.api_address)
                .unwrap_or(d.api_address),
            data_dir: args.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            kds_liveness: weft_proto::driver::Liveness::resolve(
                args.kds_ping_interval
                    .or(file.kds_ping_interval)
                    .map(|d| d.as_std()),
                args.kds_stall_timeout
                    .or(file.kds_stall_timeout)
                    .map(|d| d.as_std()),
            )
            .map_err(anyhow::Error::msg)?,
            ..d
        })
    }
}

fn resolve_dataplane(args: &RunArgs, file: &File, d: &Dataplane) -> anyhow::Result<Dataplane> {
    // The certificate and its key are one choice: a flag's choice replaces the file's.
    let (cert, key) = if args.dataplane_cert_file.is_some() || args.dataplane_key_file.is_some() {
        (
            args.dataplane_cert_file.clone(),
            args.dataplane_key_file.clone(),
        )
    } else {
        (
            file.dataplane_cert_file.clone(),
            file.dataplane_key_file.clone(),
        )
    };
    let tls_files = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => bail!(
            "--dataplane-cert-file needs --dataplane-key-file (the certificate's private key), or remove both to let the zone make its own"
        ),
        (None, Some(_)) => bail!(
            "--dataplane-key-file needs --dataplane-cert-file (the certificate chain), or remove both to let the zone make its own"
        ),
    };
    let sans = if args.dataplane_sans.is_empty() {
        file.dataplane_sans.clone().unwrap_or_default()
    } else {
        args.dataplane_sans.clone()
    };
    let sans: Vec<String> = sans
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if tls_files.is_some() && !sans.is_empty() {
        bail!(
            "--dataplane-san only applies to the generated certificate: put the names in --dataplane-cert-file's certificate, or remove --dataplane-san"
        );
    }
    let validity = args
        .workload_cert_validity
        .or(file.workload_cert_validity)
        .map_or(d.workload_cert_validity, |v| v.as_std());
    if validity < std::time::Duration::from_secs(60) {
        bail!(
            "--workload-cert-validity {:?} is too short (expected at least 1m, e.g. 24h)",
            weft_core::validate::Duration(validity).to_string()
        );
    }
    Ok(Dataplane {
        address: args
            .dataplane_address
            .or(file.dataplane_address)
            .unwrap_or(d.address),
        sans,
        tls_files,
        workload_cert_validity: validity,
        warmup: args
            .dataplane_warmup
            .or(file.dataplane_warmup)
            .map_or(d.warmup, |v| v.as_std()),
    })
}

fn resolve_global(
    address: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    fingerprint: Option<String>,
) -> anyhow::Result<Option<Global>> {
    let Some(address) = address else {
        for (set, flag) in [
            (token_file.is_some(), "--zone-token-file"),
            (ca_file.is_some(), "--global-ca-file"),
            (fingerprint.is_some(), "--global-fingerprint"),
        ] {
            if set {
                bail!(
                    "{flag} is only used with --global-address (set the address to join global, or remove {flag} to run standalone)"
                );
            }
        }
        return Ok(None);
    };
    let addresses = address
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(parse_address)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let Some(address) = addresses.first().cloned() else {
        bail!("--global-address is empty (expected host:port, or several separated by commas)");
    };
    let Some(token_file) = token_file else {
        bail!(
            "--global-address needs --zone-token-file (or WEFT_ZONE_TOKEN_FILE, or zoneTokenFile in the config file): the file holding this zone's token, issued by global"
        );
    };
    let trust = match (ca_file, fingerprint) {
        (Some(_), Some(_)) => {
            bail!(
                "--global-ca-file and --global-fingerprint are two ways to trust global: give one"
            )
        }
        (Some(ca), None) => Trust::CaFile(ca),
        (None, Some(f)) => Trust::Fingerprint(f.parse()?),
        (None, None) => bail!(
            "--global-address needs --global-ca-file or --global-fingerprint (or WEFT_ZONE_GLOBAL_CA_FILE / WEFT_ZONE_GLOBAL_FINGERPRINT): how to trust global's KDS certificate; global prints its CA's fingerprint on start"
        ),
    };
    Ok(Some(Global {
        address,
        addresses,
        token_file,
        trust,
    }))
}

/// `https://host[:port]`, or `host:port` meaning the same; KDS always runs over TLS.
fn parse_address(s: &str) -> anyhow::Result<Uri> {
    let bad = || {
        anyhow::anyhow!(
            "--global-address {s:?}: expected an https:// URL with a host (e.g. https://global.example.com:5685)"
        )
    };
    let full = if s.contains("://") {
        s.to_string()
    } else {
        format!("https://{s}")
    };
    let uri: Uri = full.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(bad());
    }
    Ok(uri)
}

impl std::str::FromStr for Fingerprint {
    type Err = anyhow::Error;

    /// `sha256:` and 64 hex digits, in either case, optionally `:`-separated per byte (as
    /// `openssl x509 -noout -fingerprint -sha256` prints them).
    fn from_str(s: &str) -> anyhow::Result<Fingerprint> {
        let bad = || {
            anyhow::anyhow!(
                "--global-fingerprint {s:?}: expected sha256:<64 hex digits> (e.g. from openssl x509 -noout -fingerprint -sha256 -in kds-ca.pem)"
            )
        };
        let hex_digits: String = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .ok_or_else(bad)?
            .chars()
            .filter(|c| *c != ':')
            .collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&hex_digits, &mut out).map_err(|_| bad())?;
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn read_file(path: &Path) -> anyhow::Result<File> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(argv: &[&str]) -> anyhow::Result<Config> {
        let argv = ["weft-zone", "run", "--zone", "east"].iter().chain(argv);
        let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command;
        Config::resolve(args)
    }

    #[test]
    fn data_plane_flags() {
        let d = resolve(&[]).unwrap().dataplane;
        assert_eq!(d, Dataplane::default());
        assert_eq!(d.address.to_string(), "127.0.0.1:5683");
        let d = resolve(&[
            "--dataplane-address",
            "0.0.0.0:6000",
            "--dataplane-san",
            "zone.example.com,10.0.0.5",
            "--workload-cert-validity",
            "2h",
            "--dataplane-warmup",
            "0s",
        ])
        .unwrap()
        .dataplane;
        assert_eq!(d.address.to_string(), "0.0.0.0:6000");
        assert_eq!(d.sans, ["zone.example.com", "10.0.0.5"]);
        assert_eq!(
            d.workload_cert_validity,
            std::time::Duration::from_secs(7200)
        );
        assert_eq!(d.warmup, std::time::Duration::ZERO);
        let e = resolve(&["--dataplane-cert-file", "/c.pem"]).unwrap_err();
        assert!(e.to_string().contains("needs --dataplane-key-file"), "{e}");
        let e = resolve(&["--workload-cert-validity", "10s"]).unwrap_err();
        assert!(e.to_string().contains("too short"), "{e}");
        let e = resolve(&[
            "--dataplane-cert-file",
            "/c.pem",
            "--dataplane-key-file",
            "/k.pem",
            "--dataplane-san",
            "x.example.com",
        ])
        .unwrap_err();
        assert!(
            e.to_string().contains("only applies to the generated"),
            "{e}"
        );
    }

    #[test]
    fn vip_flags() {
        let v = resolve(&[]).unwrap().vip;
        assert_eq!(v, Vip::default());
        assert_eq!(v.cidr.to_string(), "127.240.0.0/12");
        let v = resolve(&["--vip-cidr", "10.96.0.0/16", "--vip-retention", "10m"])
            .unwrap()
            .vip;
        assert_eq!(v.cidr.to_string(), "10.96.0.0/16");
        assert_eq!(v.retention, std::time::Duration::from_secs(600));
        let e = resolve(&["--vip-cidr", "fd00::/64"]).unwrap_err();
        assert!(
            e.to_string().starts_with("--vip-cidr \"fd00::/64\": IPv6"),
            "{e}"
        );
        let e = resolve(&["--vip-cidr", "10.96.0.1/16"]).unwrap_err();
        assert!(e.to_string().contains("did you mean 10.96.0.0/16"), "{e}");
    }
}
