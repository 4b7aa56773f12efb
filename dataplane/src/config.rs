//! weft-dp's configuration: the command line (`WEFT_DP_*` variables), and the Dataplane file
//! parsed and validated locally with `weft_core` before anything starts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use weft_core::kind::Kind;
use weft_core::resource::Resource;
use weft_core::spec::dataplane::{DEFAULT_OUTBOUND_ADDRESS, DataplaneSpec};
use weft_core::spec::fields::{Protocol, SERVICE_TAG};

use crate::{inbound, outbound};

/// The admin port when neither `--admin-address` nor `networking.admin.port` says one.
pub const DEFAULT_ADMIN_PORT: u16 = 9901;

#[derive(Debug, Parser)]
#[command(
    name = "weft-dp",
    about = "weft's sidecar proxy",
    version,
    disable_version_flag = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register with the zone and proxy the application's traffic.
    Run(Box<RunArgs>),
    /// Print the iptables commands of transparent mode (nat table, OUTPUT chain), one per line;
    /// run them as root in the application's network namespace, e.g. `| sh -e`.
    TransparentRules(RulesArgs),
    /// Print weft-dp's version.
    Version,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RulesArgs {
    /// The proxy's --transparent-outbound-port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// The zone's --vip-cidr: TCP connections to it are redirected to the proxy.
    #[arg(long, default_value = "127.240.0.0/12")]
    pub vip_cidr: String,
    /// Redirect every DNS query (UDP and TCP port 53) to the proxy's --dns-address port on
    /// 127.0.0.1; needs --uid.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub dns_port: Option<u16>,
    /// The user weft-dp runs as: its own connections are never redirected.
    #[arg(long)]
    pub uid: Option<u32>,
}

impl RulesArgs {
    /// The commands, or an error naming the flag.
    pub fn commands(&self) -> anyhow::Result<Vec<String>> {
        let vip_cidr = crate::transparent::parse_cidr(&self.vip_cidr)
            .map_err(|e| anyhow::anyhow!("--vip-cidr: {e}"))?;
        crate::transparent::Rules {
            outbound_port: self.outbound_port,
            vip_cidr,
            dns_port: self.dns_port,
            uid: self.uid,
        }
        .commands()
        .map_err(anyhow::Error::msg)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The zone's data-plane API, e.g. https://zone.internal:5683.
    #[arg(long, env = "WEFT_DP_ZONE_ADDRESS")]
    pub zone_address: String,
    /// The CA that signed the zone's data-plane API certificate, PEM
    /// (`<zone data dir>/dataplane-ca.pem`).
    #[arg(long, env = "WEFT_DP_ZONE_CA_FILE")]
    pub zone_ca_file: PathBuf,
    /// The Dataplane resource this proxy runs (type, name, mesh, spec), YAML or JSON.
    #[arg(long, env = "WEFT_DP_DATAPLANE_FILE")]
    pub dataplane_file: PathBuf,
    /// The dataplane token (`weftctl generate dataplane-token`); read again at every
    /// connection, so it can be rotated in place.
    #[arg(long, env = "WEFT_DP_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Where `/ready`, `/config` and `/metrics` are served; default 127.0.0.1 and the
    /// Dataplane's `networking.admin.port`, else 9901.
    #[arg(long, env = "WEFT_DP_ADMIN_ADDRESS")]
    pub admin_address: Option<SocketAddr>,
    /// Worker threads: 1 runs everything on one thread (the budget is one core per proxy).
    #[arg(long, env = "WEFT_DP_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: u16,
    /// On SIGTERM, how long open connections get to finish (e.g. 10s, 500ms, 1m).
    #[arg(long, env = "WEFT_DP_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Log filter: a level and/or target=level list (e.g. info,weft_dp=debug); else RUST_LOG, else info.
    #[arg(long, env = "WEFT_DP_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log lines as text, or as JSON objects (one per line).
    #[arg(long, env = "WEFT_DP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve DNS (UDP and TCP) on this address, e.g. 127.0.0.1:15053: `<service>.mesh` and
    /// `<service>.<zone>.mesh` resolve to the mesh's VIPs, other names are forwarded upstream.
    /// Off by default.
    #[arg(long, env = "WEFT_DP_DNS_ADDRESS")]
    pub dns_address: Option<SocketAddr>,
    /// The TTL of the VIP answers (e.g. 30s).
    #[arg(long, env = "WEFT_DP_DNS_TTL", default_value = "30s", value_parser = parse_duration)]
    pub dns_ttl: Duration,
    /// Where names outside `.mesh` are forwarded, IP:PORT; default the first `nameserver` of
    /// /etc/resolv.conf, port 53.
    #[arg(long, env = "WEFT_DP_DNS_UPSTREAM")]
    pub dns_upstream: Option<SocketAddr>,
    /// Listen on every VIP:port of the mesh's VIP table (outbounds without declaring them).
    /// Off by default: several proxies on one host would collide.
    #[arg(long, env = "WEFT_DP_BIND_VIPS")]
    pub bind_vips: bool,
    /// Transparent mode: accept on 127.0.0.1:PORT the connections iptables redirects from the
    /// mesh's VIPs (`weft-dp transparent-rules` prints the rules) and send each to the VIP's
    /// service. Off by default.
    #[arg(long, env = "WEFT_DP_TRANSPARENT_OUTBOUND_PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub transparent_outbound_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
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

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<weft_core::validate::Duration>()
        .map(|d| d.as_std())
}

/// Everything `run` needs, read and checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub zone_address: String,
    pub zone_ca_pem: String,
    pub token_file: PathBuf,
    pub dataplane: Dataplane,
    pub admin_address: SocketAddr,
    pub threads: u16,
    pub drain_timeout: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
    /// The embedded DNS server, when `--dns-address` is set.
    pub dns: Option<crate::dns::Config>,
    /// `--bind-vips`: an outbound listener on every VIP:port.
    pub bind_vips: bool,
    /// `--transparent-outbound-port`: the listener iptables redirects to.
    pub transparent: Option<crate::transparent::Config>,
}

/// The first `nameserver` of a resolv.conf, port 53.
pub fn resolv_conf_nameserver(text: &str) -> Option<SocketAddr> {
    text.lines()
        .map(|l| l.split(['#', ';']).next().unwrap_or("").split_whitespace())
        .find_map(|mut words| {
            (words.next() == Some("nameserver"))
                .then(|| words.next()?.split('%').next()?.parse::<IpAddr>().ok())
                .flatten()
        })
        .map(|ip| SocketAddr::new(ip, 53))
}

fn dns_config(args: &RunArgs) -> anyhow::Result<Option<crate::dns::Config>> {
    let Some(address) = args.dns_address else {
        return Ok(None);
    };
    let upstream = match args.dns_upstream {
        Some(u) => u,
        None => {
            let text = std::fs::read_to_string("/etc/resolv.conf").with_context(|| {
                "--dns-address: reading /etc/resolv.conf for the upstream resolver (or set --dns-upstream IP:PORT)"
            })?;
            resolv_conf_nameserver(&text).ok_or_else(|| {
                anyhow::anyhow!(
                    "--dns-address: no nameserver in /etc/resolv.conf (set --dns-upstream IP:PORT)"
                )
            })?
        }
    };
    anyhow::ensure!(
        upstream != address,
        "--dns-upstream {upstream}: the same as --dns-address (queries would loop; name the real resolver)"
    );
    anyhow::ensure!(
        !args.dns_ttl.is_zero() && args.dns_ttl.as_secs() <= u64::from(u32::MAX),
        "--dns-ttl: must be at least 1s (e.g. 30s)"
    );
    Ok(Some(crate::dns::Config {
        address,
        upstream,
        ttl: args.dns_ttl,
        upstream_timeout: crate::dns::UPSTREAM_TIMEOUT,
    }))
}

/// The Dataplane this proxy runs: the file's text (sent to the zone as is) and its parsed form.
#[derive(Debug, Clone)]
pub struct Dataplane {
    pub text: String,
    pub name: String,
    pub mesh: String,
    pub spec: DataplaneSpec,
}

impl Config {
    /// Read the files the flags name and validate them. Errors name the file and, for the
    /// Dataplane, the field.
    pub fn load(args: RunArgs) -> anyhow::Result<Config> {
        let dataplane = Dataplane::load(&args.dataplane_file)?;
        let token = std::fs::read_to_string(&args.token_file)
            .with_context(|| format!("--token-file {}", args.token_file.display()))?;
        anyhow::ensure!(
            !token.trim().is_empty(),
            "--token-file {}: the file is empty (put the token from `weftctl generate dataplane-token` in it)",
            args.token_file.display()
        );
        let zone_ca_pem = std::fs::read_to_string(&args.zone_ca_file)
            .with_context(|| format!("--zone-ca-file {}", args.zone_ca_file.display()))?;
        check_ca(&zone_ca_pem)
            .with_context(|| format!("--zone-ca-file {}", args.zone_ca_file.display()))?;
        crate::client::check_address(&args.zone_address)?;
        let dns = dns_config(&args)?;
        let admin_address = args.admin_address.unwrap_or_else(|| {
            let port = dataplane
                .spec
                .networking
                .admin
                .as_ref()
                .map_or(DEFAULT_ADMIN_PORT, |a| a.port.0);
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
        });
        Ok(Config {
            zone_address: args.zone_address,
            zone_ca_pem,
            token_file: args.token_file,
            dataplane,
            admin_address,
            threads: args.threads,
            drain_timeout: args.drain_timeout,
            log_level: args
                .log_level
                .or_else(|| std::env::var("RUST_LOG").ok())
                .unwrap_or_else(|| "info".to_string()),
            log_format: args.log_format,
            dns,
            bind_vips: args.bind_vips,
            transparent: args
                .transparent_outbound_port
                .map(crate::transparent::Config::new),
        })
    }

    /// Whether the zone should send the VIP table and every service's endpoints.
    pub fn virtual_outbounds(&self) -> bool {
        self.dns.is_some() || self.bind_vips || self.transparent.is_some()
    }
}

/// One inbound listener to start: where to listen, and what `inbound::run` gets.
#[derive(Debug, Clone)]
pub struct InboundListener {
    /// `networking.inbound[i]`, for messages.
    pub field: String,
    pub host: String,
    pub port: u16,
    pub inbound: inbound::Inbound,
}

/// One outbound listener to start.
#[derive(Debug, Clone)]
pub struct OutboundListener {
    pub field: String,
    pub host: String,
    pub port: u16,
    pub outbound: outbound::Outbound,
}

impl Dataplane {
    pub fn load(path: &Path) -> anyhow::Result<Dataplane> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--dataplane-file {}", path.display()))?;
        Dataplane::parse(&text).with_context(|| format!("dataplane file {}", path.display()))
    }

    /// Parse and validate: exactly one document, of type Dataplane.
    pub fn parse(text: &str) -> anyhow::Result<Dataplane> {
        let mut resources = weft_core::document::parse(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(
            resources.len() == 1,
            "expected one Dataplane document, found {}",
            resources.len()
        );
        let r: Resource = resources.remove(0);
        anyhow::ensure!(
            r.kind == Kind::Dataplane,
            "type: expected Dataplane, got {}",
            r.kind
        );
        let spec: DataplaneSpec = serde_json::from_value(r.spec.clone())
            .context("spec: not a Dataplane spec after validation")?;
        Ok(Dataplane {
            text: text.to_string(),
            mesh: r.mesh.clone().unwrap_or_default(),
            name: r.name,
            spec,
        })
    }

    /// The service of the first inbound: what the workload certificate is requested for
    /// (the zone decides the identity; this is only what the CSR names).
    pub fn service(&self) -> String {
        self.spec
            .networking
            .inbound
            .first()
            .and_then(|i| i.tags.get(SERVICE_TAG))
            .cloned()
            .unwrap_or_default()
    }

    pub fn inbounds(&self) -> Vec<InboundListener> {
        let n = &self.spec.networking;
        n.inbound
            .iter()
            .enumerate()
            .map(|(i, ib)| InboundListener {
                field: format!("networking.inbound[{i}]"),
                host: ib.address.as_ref().unwrap_or(&n.address).0.clone(),
                port: ib.port.0,
                inbound: inbound::Inbound {
                    port: ib.port.0,
                    service: ib.tags.get(SERVICE_TAG).cloned().unwrap_or_default(),
                    protocol: ib.protocol.unwrap_or(Protocol::Tcp),
                    app: SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::LOCALHOST),
                        ib.service_port.unwrap_or(ib.port).0,
                    ),
                },
            })
            .collect()
    }

    pub fn outbounds(&self) -> Vec<OutboundListener> {
        self.spec
            .networking
            .outbound
            .iter()
            .enumerate()
            .map(|(i, ob)| OutboundListener {
                field: format!("networking.outbound[{i}]"),
                host: ob
                    .address
                    .as_ref()
                    .map_or(DEFAULT_OUTBOUND_ADDRESS.to_string(), |a| a.0.clone()),
                port: ob.port.0,
                outbound: outbound::Outbound::new(
                    ob.tags.get(SERVICE_TAG).map_or("", String::as_str),
                ),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DP: &str = "type: Dataplane
name: web-1
mesh: default
spec:
  networking:
    address: 10.0.0.5
    admin: {port: 9902}
    inbound:
      - port: 8080
        servicePort: 18080
        tags: {weft.io/service: web}
        protocol: http
      - port: 8081
        address: 10.0.0.6
        tags: {weft.io/service: web-admin}
    outbound:
      - port: 10001
        tags: {weft.io/service: backend}
";

    #[test]
    fn listeners_from_the_dataplane() {
        let dp = Dataplane::parse(DP).unwrap();
        assert_eq!((dp.name.as_str(), dp.mesh.as_str()), ("web-1", "default"));
        assert_eq!(dp.service(), "web");
        let ib = dp.inbounds();
        assert_eq!((ib[0].host.as_str(), ib[0].port), ("10.0.0.5", 8080));
        assert_eq!(ib[0].inbound.app, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(ib[0].inbound.protocol, Protocol::Http);
        assert_eq!((ib[1].host.as_str(), ib[1].port), ("10.0.0.6", 8081));
        assert_eq!(ib[1].inbound.app, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(ib[1].inbound.protocol, Protocol::Tcp);
        let ob = dp.outbounds();
        assert_eq!((ob[0].host.as_str(), ob[0].port), ("127.0.0.1", 10001));
        assert_eq!(ob[0].outbound.service, "backend");
    }

    #[test]
    fn errors_name_the_field() {
        let err = Dataplane::parse(&DP.replace("weft.io/service: web}", "app: web}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.networking.inbound[0].tags"), "{err}");
        let err = Dataplane::parse("type: Mesh\nname: default\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("type: expected Dataplane"), "{err}");
        let err = Dataplane::parse(&format!("{DP}---\n{DP}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected one Dataplane document"), "{err}");
    }

    #[test]
    fn the_zone_ca_must_hold_a_certificate() {
        assert!(check_ca("").is_err());
        assert!(check_ca("-----BEGIN CERTIFICATE-----\nnot base64\n").is_err());
        let ca = weft_core::pki::RootCa::generate("default", Duration::from_secs(60)).unwrap();
        check_ca(ca.cert_pem()).unwrap();
    }

    #[test]
    fn flags_and_defaults() {
        let cli = Cli::try_parse_from([
            "weft-dp",
            "run",
            "--zone-address",
            "https://127.0.0.1:5683",
            "--zone-ca-file",
            "ca.pem",
            "--dataplane-file",
            "dp.yaml",
            "--token-file",
            "token",
            "--drain-timeout",
            "1m30s",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run expected")
        };
        assert_eq!(args.threads, 1);
        assert_eq!(args.drain_timeout, Duration::from_secs(90));
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.dns_address, None);
        assert_eq!(args.dns_ttl, Duration::from_secs(30));
        assert!(!args.bind_vips);
        assert!(
            Cli::try_parse_from(["weft-dp", "run", "--threads", "0"]).is_err(),
            "--threads 0 is refused"
        );
    }

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch example.com\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\n";
        assert_eq!(
            resolv_conf_nameserver(text),
            Some("[fe80::1]:53".parse().unwrap())
        );
        assert_eq!(
            resolv_conf_nameserver("nameserver 10.0.0.2 # x\n"),
            Some("10.0.0.2:53".parse().unwrap())
        );
        assert_eq!(resolv_conf_nameserver("search x\nnameserver\n"), None);
    }

    #[test]
    fn dns_flags() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["weft-dp", "run", "--zone-address", "https://a:1"];
            argv.extend_from_slice(&[
                "--zone-ca-file",
                "c",
                "--dataplane-file",
                "d",
                "--token-file",
                "t",
            ]);
            argv.extend_from_slice(extra);
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("run expected")
            };
            *args
        };
        assert!(dns_config(&parse(&[])).unwrap().is_none());
        let cfg = dns_config(&parse(&[
            "--dns-address",
            "127.0.0.1:15053",
            "--dns-upstream",
            "127.0.0.1:53",
            "--dns-ttl",
            "5s",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(cfg.upstream, "127.0.0.1:53".parse().unwrap());
        assert_eq!(cfg.ttl, Duration::from_secs(5));
        let err = dns_config(&parse(&[
            "--dns-address",
            "127.0.0.1:15053",
            "--dns-upstream",
            "127.0.0.1:15053",
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("--dns-upstream"), "{err}");
        let args = parse(&["--bind-vips"]);
        assert!(args.bind_vips);
        let args = parse(&["--transparent-outbound-port", "15001"]);
        assert_eq!(args.transparent_outbound_port, Some(15001));
    }

    #[test]
    fn transparent_rules_flags() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["weft-dp", "transparent-rules"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::TransparentRules(args)) => Ok(args),
                Ok(other) => panic!("transparent-rules expected, got {other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        let cmds = parse(&["--outbound-port", "15001"])
            .unwrap()
            .commands()
            .unwrap();
        assert!(
            cmds.iter()
                .any(|c| c.ends_with("-p tcp -d 127.240.0.0/12 -j REDIRECT --to-ports 15001")),
            "{cmds:?}"
        );
        let err = parse(&["--outbound-port", "15001", "--vip-cidr", "240.0.0.0"])
            .unwrap()
            .commands()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--vip-cidr: "), "{err}");
        let err = parse(&["--outbound-port", "15001", "--dns-port", "15053"])
            .unwrap()
            .commands()
            .unwrap_err()
            .to_string();
        assert!(err.contains("--uid"), "{err}");
        assert!(parse(&[]).is_err(), "--outbound-port is required");
        assert!(parse(&["--outbound-port", "0"]).is_err());
    }
}
