//! weft-ingress's configuration: the command line (`WEFT_INGRESS_*` variables), checked once
//! at the edge, and the ZoneIngress resource built from it and validated locally with
//! `weft_core` before anything starts (the zone gets exactly that document in `Hello`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use weft_core::kind::Kind;

/// The admin address when `--admin-address` is not given.
pub const DEFAULT_ADMIN_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9902);

#[derive(Debug, Parser)]
#[command(
    name = "weft-ingress",
    about = "weft's zone ingress and zone egress",
    version,
    disable_version_flag = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register with the zone and route other zones' connections to local services by SNI.
    Run(Box<RunArgs>),
    /// Print weft-ingress's version.
    Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Zone ingress: other zones' proxies connect here; routed by SNI to local services.
    Ingress,
    /// Zone egress: this zone's proxies reach MeshExternalServices through it, and other
    /// zones too when their mesh has routing.zoneEgress (passed through, not terminated).
    Egress,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// What to run: a zone ingress, or a zone egress.
    #[arg(long, env = "WEFT_INGRESS_MODE", value_enum, default_value_t = Mode::Ingress)]
    pub mode: Mode,
    /// The zone's data-plane API, e.g. https://zone.internal:5683.
    #[arg(long, env = "WEFT_INGRESS_ZONE_ADDRESS")]
    pub zone_address: String,
    /// The CA that signed the zone's data-plane API certificate, PEM
    /// (`<zone data dir>/dataplane-ca.pem`).
    #[arg(long, env = "WEFT_INGRESS_ZONE_CA_FILE")]
    pub zone_ca_file: PathBuf,
    /// A zone token with scope ingress, or egress with --mode egress (`weftctl generate
    /// zone-token --zone Z --scope ingress|egress`); read again at every connection, so it
    /// can be rotated in place.
    #[arg(long, env = "WEFT_INGRESS_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// The ZoneIngress (ZoneEgress) resource's name.
    #[arg(long, env = "WEFT_INGRESS_NAME")]
    pub name: String,
    /// Where other zones' connections (egress: this zone's proxies') are accepted, IP:PORT
    /// (also the resource's networking.address and networking.port).
    #[arg(long, env = "WEFT_INGRESS_ADDRESS")]
    pub address: SocketAddr,
    /// The address other zones dial when --address is not reachable from them (e.g. a load
    /// balancer's); requires --advertised-port.
    #[arg(long, env = "WEFT_INGRESS_ADVERTISED_ADDRESS")]
    pub advertised_address: Option<String>,
    /// The port other zones dial with --advertised-address.
    #[arg(long, env = "WEFT_INGRESS_ADVERTISED_PORT")]
    pub advertised_port: Option<u16>,
    /// Egress: the CA certificates external services' TLS certificates are verified
    /// against, PEM (MeshExternalService tls.verification.mode Secured or SkipSAN); the
    /// system bundle by default (SSL_CERT_FILE, else /etc/ssl/certs/ca-certificates.crt).
    #[arg(long, env = "WEFT_INGRESS_EXTERNAL_CA_FILE")]
    pub external_ca_file: Option<PathBuf>,
    /// Where `/ready`, `/config` and `/metrics` are served.
    #[arg(long, env = "WEFT_INGRESS_ADMIN_ADDRESS", default_value_t = DEFAULT_ADMIN_ADDRESS)]
    pub admin_address: SocketAddr,
    /// Worker threads: 1 runs everything on one thread.
    #[arg(long, env = "WEFT_INGRESS_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: u16,
    /// On SIGTERM, how long open connections get to finish (e.g. 10s, 500ms, 1m).
    #[arg(long, env = "WEFT_INGRESS_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Log filter: a level and/or target=level list (e.g. info,weft_ingress=debug); else RUST_LOG, else info.
    #[arg(long, env = "WEFT_INGRESS_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log lines as text, or as JSON objects (one per line).
    #[arg(long, env = "WEFT_INGRESS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<weft_core::validate::Duration>()
        .map(|d| d.as_std())
}

/// Everything `run` needs, read and checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// Egress: the external CA certificates, PEM.
    pub external_ca_pem: Option<String>,
    pub zone_address: String,
    pub zone_ca_pem: String,
    pub token_file: PathBuf,
    pub name: String,
    /// The ZoneIngress document sent in `Hello` (JSON).
    pub resource: String,
    pub address: SocketAddr,
    pub admin_address: SocketAddr,
    pub threads: u16,
    pub drain_timeout: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
}

impl Config {
    /// Read the files the flags name and validate everything. Errors name the flag and the
    /// fix.
    pub fn load(args: RunArgs) -> anyhow::Result<Config> {
        let scope = match args.mode {
            Mode::Ingress => "ingress",
            Mode::Egress => "egress",
        };
        let token = std::fs::read_to_string(&args.token_file)
            .with_context(|| format!("--token-file {}", args.token_file.display()))?;
        anyhow::ensure!(
            !token.trim().is_empty(),
            "--token-file {}: the file is empty (put the token from `weftctl generate zone-token --zone Z --scope {scope}` in it)",
            args.token_file.display()
        );
        let zone_ca_pem = std::fs::read_to_string(&args.zone_ca_file)
            .with_context(|| format!("--zone-ca-file {}", args.zone_ca_file.display()))?;
        check_ca(&zone_ca_pem)
            .with_context(|| format!("--zone-ca-file {}", args.zone_ca_file.display()))?;
        crate::session::check_address(&args.zone_address)?;
        let (resource, external_ca_pem) = match args.mode {
            Mode::Ingress => {
                anyhow::ensure!(
                    args.external_ca_file.is_none(),
                    "--external-ca-file: only for --mode egress (remove it)"
                );
                let r = resource(
                    &args.name,
                    args.address,
                    args.advertised_address.as_deref(),
                    args.advertised_port,
                )?;
                (r, None)
            }
            Mode::Egress => {
                anyhow::ensure!(
                    args.advertised_address.is_none() && args.advertised_port.is_none(),
                    "--advertised-address/--advertised-port: only for --mode ingress (an egress is dialed by its own zone's proxies at --address)"
                );
                let path = args.external_ca_file.clone().unwrap_or_else(|| {
                    std::env::var_os("SSL_CERT_FILE")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"))
                });
                let pem = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "--external-ca-file {} (the CA certificates external services are verified against; give one with --external-ca-file)",
                        path.display()
                    )
                })?;
                crate::egress::external_roots(&pem)
                    .with_context(|| format!("--external-ca-file {}", path.display()))?;
                (egress_resource(&args.name, args.address)?, Some(pem))
            }
        };
        Ok(Config {
            mode: args.mode,
            external_ca_pem,
            zone_address: args.zone_address,
            zone_ca_pem,
            token_file: args.token_file,
            name: args.name,
            resource,
            address: args.address,
            admin_address: args.admin_address,
            threads: args.threads,
            drain_timeout: args.drain_timeout,
            log_level: args
                .log_level
                .or_else(|| std::env::var("RUST_LOG").ok())
                .unwrap_or_else(|| "info".to_string()),
            log_format: args.log_format,
        })
    }
}

/// The ZoneIngress document for these flags, as JSON, validated with `weft_core` (the
/// zone validates it again). Field errors are translated back to the flags that set them.
pub fn resource(
    name: &str,
    address: SocketAddr,
    advertised_address: Option<&str>,
    advertised_port: Option<u16>,
) -> anyhow::Result<String> {
    match (advertised_address, advertised_port) {
        (Some(_), None) => {
            anyhow::bail!("--advertised-address needs --advertised-port (set both, or neither)")
        }
        (None, Some(_)) => {
            anyhow::bail!("--advertised-port needs --advertised-address (set both, or neither)")
        }
        _ => {}
    }
    let mut networking = json!({
        "address": address.ip().to_string(),
        "port": address.port(),
    });
    if let (Some(a), Some(p)) = (advertised_address, advertised_port) {
        networking["advertisedAddress"] = json!(a);
        networking["advertisedPort"] = json!(p);
    }
    let doc = json!({
        "type": "ZoneIngress",
        "name": name,
        "spec": {"networking": networking},
    });
    let text = doc.to_string();
    let parsed = weft_core::document::parse(&text).map_err(|e| {
        let msg = e
            .to_string()
            .replace("spec.networking.advertisedAddress", "--advertised-address")
            .replace("spec.networking.advertisedPort", "--advertised-port")
            .replace("spec.networking.address", "--address")
            .replace("spec.networking.port", "--address (port)");
        anyhow::anyhow!("the ZoneIngress these flags describe is invalid: {msg}")
    })?;
    anyhow::ensure!(
        parsed.len() == 1 && parsed[0].kind == Kind::ZoneIngress,
        "internal: the ZoneIngress document did not parse back as one ZoneIngress"
    );
    Ok(text)
}

/// The ZoneEgress document for these flags, as JSON, validated with `weft_core`.
pub fn egress_resource(name: &str, address: SocketAddr) -> anyhow::Result<String> {
    let doc = json!({
        "type": "ZoneEgress",
        "name": name,
        "spec": {"networking": {"address": address.ip().to_string(), "port": address.port()}},
    });
    let text = doc.to_string();
    let parsed = weft_core::document::parse(&text).map_err(|e| {
        let msg = e
            .to_string()
            .replace("spec.networking.address", "--address")
            .replace("spec.networking.port", "--address (port)");
        anyhow::anyhow!("the ZoneEgress these flags describe is invalid: {msg}")
    })?;
    anyhow::ensure!(
        parsed.len() == 1 && parsed[0].kind == Kind::ZoneEgress,
        "internal: the ZoneEgress document did not parse back as one ZoneEgress"
    );
    Ok(text)
}

/// At least one readable PEM certificate.
fn check_ca(pem: &str) -> anyhow::Result<()> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("not readable PEM: {e}"))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "no PEM certificate in the file (expected the zone's dataplane-ca.pem)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec![
            "weft-ingress",
            "run",
            "--zone-address",
            "https://127.0.0.1:5683",
            "--zone-ca-file",
            "ca.pem",
            "--token-file",
            "token",
            "--name",
            "ingress-1",
            "--address",
            "10.0.0.9:10001",
        ];
        argv.extend_from_slice(extra);
        let Command::Run(args) = Cli::try_parse_from(argv)?.command else {
            panic!("run expected")
        };
        Ok(*args)
    }

    #[test]
    fn flags_and_defaults() {
        let a = args(&[]).unwrap();
        assert_eq!(a.mode, Mode::Ingress);
        assert_eq!(a.threads, 1);
        assert_eq!(a.drain_timeout, Duration::from_secs(10));
        assert_eq!(a.admin_address, DEFAULT_ADMIN_ADDRESS);
        assert_eq!(a.log_format, LogFormat::Text);
        let a = args(&["--drain-timeout", "1m30s", "--threads", "4"]).unwrap();
        assert_eq!(a.drain_timeout, Duration::from_secs(90));
        assert_eq!(a.threads, 4);
        assert!(args(&["--threads", "0"]).is_err(), "--threads 0 is refused");
        assert!(args(&["--mode", "sideways"]).is_err());
    }

    #[test]
    fn egress_flags() {
        let a = args(&[
            "--mode",
            "egress",
            "--advertised-address",
            "lb",
            "--advertised-port",
            "1",
        ])
        .unwrap();
        assert_eq!(a.mode, Mode::Egress);
        let text = egress_resource("egress-1", "10.0.0.9:10002".parse().unwrap()).unwrap();
        let r = weft_core::document::parse(&text).unwrap().remove(0);
        assert_eq!(r.kind, Kind::ZoneEgress);
        assert_eq!(r.spec["networking"]["port"], 10002);
        let err = egress_resource("Bad_Name", "10.0.0.9:1".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("name"), "{err}");
    }

    #[test]
    fn the_resource_is_a_valid_zone_ingress() {
        let addr: SocketAddr = "10.0.0.9:10001".parse().unwrap();
        let text = resource("ingress-1", addr, Some("lb.example.com"), Some(443)).unwrap();
        let r = weft_core::document::parse(&text).unwrap().remove(0);
        assert_eq!(r.kind, Kind::ZoneIngress);
        assert_eq!(r.name, "ingress-1");
        assert_eq!(r.spec["networking"]["address"], "10.0.0.9");
        assert_eq!(r.spec["networking"]["port"], 10001);
        assert_eq!(r.spec["networking"]["advertisedAddress"], "lb.example.com");
        assert_eq!(r.spec["networking"]["advertisedPort"], 443);
        let text = resource("ingress-1", addr, None, None).unwrap();
        assert!(!text.contains("advertised"), "{text}");
    }

    #[test]
    fn resource_errors_name_the_flag() {
        let addr: SocketAddr = "10.0.0.9:10001".parse().unwrap();
        let err = resource("ingress-1", addr, Some("lb"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--advertised-port"), "{err}");
        let err = resource("ingress-1", addr, None, Some(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--advertised-address"), "{err}");
        let err = resource("Bad_Name", addr, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("name"), "{err}");
        let err = resource("ingress-1", "10.0.0.9:0".parse().unwrap(), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--address"), "{err}");
    }

    #[test]
    fn the_zone_ca_must_hold_a_certificate() {
        assert!(check_ca("").is_err());
        assert!(check_ca("-----BEGIN CERTIFICATE-----\nnot base64\n").is_err());
    }
}
