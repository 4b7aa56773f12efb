//! Typed configuration of weft-global: command-line flags, `WEFT_*` environment variables
//! and an optional YAML file, resolved once at the edge (flags and env win over the file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(name = "weft-global", version, about = "weft global control plane")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the global control plane.
    Run(RunArgs),
    /// Apply the database migrations and exit.
    Migrate(DbArgs),
    /// Manage the API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a new token for a role and print it; the old one stops working within seconds.
    Rotate {
        #[arg(long, value_enum)]
        role: crate::auth::Role,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct DbArgs {
    /// PostgreSQL URL, e.g. postgres://weft:secret@127.0.0.1:5432/weft.
    #[arg(long, env = "WEFT_POSTGRES_URL")]
    pub postgres_url: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Memory,
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// YAML config file; flags and WEFT_* variables override what it says.
    #[arg(long, env = "WEFT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where resources live [default: memory].
    #[arg(long, env = "WEFT_STORE", value_enum)]
    pub store: Option<StoreKind>,
    /// PostgreSQL URL, with --store postgres.
    #[arg(long, env = "WEFT_POSTGRES_URL")]
    pub postgres_url: Option<String>,
    /// Do not apply database migrations on start.
    #[arg(long, env = "WEFT_NO_MIGRATE")]
    pub no_migrate: bool,
    /// Address of the REST API [default: 127.0.0.1:5681].
    #[arg(long, env = "WEFT_API_ADDRESS")]
    pub api_address: Option<SocketAddr>,
    /// Directory for the generated tokens [default: ./weft-data].
    #[arg(long, env = "WEFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(flatten)]
    pub kds: KdsArgs,
}

/// Where zones connect (KDS, gRPC over TLS).
#[derive(Args, Debug, Default)]
pub struct KdsArgs {
    /// Address of the KDS server zones dial [default: 127.0.0.1:5685].
    #[arg(long, env = "WEFT_KDS_ADDRESS")]
    pub kds_address: Option<SocketAddr>,
    /// Extra DNS names or IPs for the generated KDS certificate (repeatable).
    #[arg(long = "kds-tls-san", env = "WEFT_KDS_TLS_SANS", value_delimiter = ',')]
    pub kds_tls_sans: Vec<String>,
    /// Serve this certificate chain (PEM) instead of the generated one (with --kds-tls-key and --kds-tls-ca).
    #[arg(long, env = "WEFT_KDS_TLS_CERT", requires_all = ["kds_tls_key", "kds_tls_ca"])]
    pub kds_tls_cert: Option<PathBuf>,
    #[arg(long, env = "WEFT_KDS_TLS_KEY")]
    pub kds_tls_key: Option<PathBuf>,
    #[arg(long, env = "WEFT_KDS_TLS_CA")]
    pub kds_tls_ca: Option<PathBuf>,
    /// How often each KDS stream is pinged [default: 5s].
    #[arg(long, env = "WEFT_KDS_PING_INTERVAL")]
    pub kds_ping_interval: Option<weft_core::validate::Duration>,
    /// A KDS stream silent for this long is torn down [default: 20s].
    #[arg(long, env = "WEFT_KDS_STALL_TIMEOUT")]
    pub kds_stall_timeout: Option<weft_core::validate::Duration>,
}

/// The optional YAML file: the same settings as the flags.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    store: Option<StoreKind>,
    postgres_url: Option<String>,
    migrate: Option<bool>,
    api_address: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    kds_address: Option<SocketAddr>,
    kds_tls_sans: Option<Vec<String>>,
    kds_tls_cert: Option<PathBuf>,
    kds_tls_key: Option<PathBuf>,
    kds_tls_ca: Option<PathBuf>,
    kds_ping_interval: Option<weft_core::validate::Duration>,
    kds_stall_timeout: Option<weft_core::validate::Duration>,
}

/// The resolved configuration of `weft-global run`.
#[derive(Clone, Debug)]
pub struct Config {
    pub store: StoreKind,
    pub postgres_url: Option<String>,
    pub migrate: bool,
    pub api_address: SocketAddr,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    pub kds: KdsConfig,
}

/// The resolved KDS settings.
#[derive(Clone, Debug)]
pub struct KdsConfig {
    pub address: SocketAddr,
    pub tls_sans: Vec<String>,
    /// Operator-provided (cert chain, key, CA) files; generated material when absent.
    pub tls_files: Option<(PathBuf, PathBuf, PathBuf)>,
    pub liveness: weft_proto::driver::Liveness,
}

impl Default for KdsConfig {
    fn default() -> Self {
        KdsConfig {
            address: "127.0.0.1:5685".parse().expect("valid default"),
            tls_sans: Vec::new(),
            tls_files: None,
            liveness: weft_proto::driver::Liveness::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: StoreKind::Memory,
            postgres_url: None,
            migrate: true,
            api_address: "127.0.0.1:5681".parse().expect("valid default"),
            data_dir: PathBuf::from("weft-data"),
            log_format: LogFormat::Text,
            kds: KdsConfig::default(),
        }
    }
}

impl Config {
    /// Resolve flags over the file over the defaults; check what must go together.
    pub fn resolve(args: RunArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => File::default(),
        };
        let d = Config::default();
        let cfg = Config {
            store: args.store.or(file.store).unwrap_or(d.store),
            postgres_url: args.postgres_url.or(file.postgres_url),
            migrate: !args.no_migrate && file.migrate.unwrap_or(true),
            api_address: args
                .api_address
                .or(file.api_address)
                .unwrap_or(d.api_address),
            data_dir: args.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            kds: KdsConfig {
                address: args
                    .kds
                    .kds_address
                    .or(file.kds_address)
                    .unwrap_or(d.kds.address),
                tls_sans: if args.kds.kds_tls_sans.is_empty() {
                    file.kds_tls_sans.unwrap_or_default()
                } else {
                    args.kds.kds_tls_sans
                },
                tls_files: match (
                    args.kds.kds_tls_cert.or(file.kds_tls_cert),
                    args.kds.kds_tls_key.or(file.kds_tls_key),
                    args.kds.kds_tls_ca.or(file.kds_tls_ca),
                ) {
                    (Some(c), Some(k), Some(ca)) => Some((c, k, ca)),
                    (None, None, None) => None,
                    _ => {
                        anyhow::bail!("--kds-tls-cert, --kds-tls-key and --kds-tls-ca go together")
                    }
                },
                liveness: weft_proto::driver::Liveness::resolve(
                    args.kds
                        .kds_ping_interval
                        .or(file.kds_ping_interval)
                        .map(|d| d.as_std()),
                    args.kds
                        .kds_stall_timeout
                        .or(file.kds_stall_timeout)
                        .map(|d| d.as_std()),
                )
                .map_err(anyhow::Error::msg)?,
            },
        };
        if cfg.store == StoreKind::Postgres && cfg.postgres_url.is_none() {
            anyhow::bail!(
                "--store postgres needs --postgres-url (or WEFT_POSTGRES_URL, or postgresUrl in the config file)"
            );
        }
        Ok(cfg)
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

    #[test]
    fn flags_override_file_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("global.yaml");
        std::fs::write(
            &path,
            "store: postgres\npostgresUrl: postgres://x/y\napiAddress: 127.0.0.1:7000\n",
        )
        .unwrap();
        let cfg = Config::resolve(RunArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.store, StoreKind::Postgres);
        assert_eq!(cfg.api_address.port(), 7000);
        assert!(cfg.migrate);
        let cfg = Config::resolve(RunArgs {
            config: Some(path),
            store: Some(StoreKind::Memory),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.store, StoreKind::Memory);
        assert_eq!(
            Config::resolve(RunArgs::default())
                .unwrap()
                .api_address
                .port(),
            5681
        );
    }

    #[test]
    fn bad_config_is_one_clear_error() {
        let err = Config::resolve(RunArgs {
            store: Some(StoreKind::Postgres),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--postgres-url"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "stor: memory\n").unwrap();
        let err = Config::resolve(RunArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("stor"), "{err:#}");
    }
}
