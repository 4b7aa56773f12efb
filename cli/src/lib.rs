//! weftctl: the admin CLI of weft's global control plane. The command line is parsed once
//! into [`Cli`]; [`run`] resolves which control plane to talk to and dispatches to the
//! command modules, which return what to print on stdout.

pub mod apply;
pub mod client;
pub mod config;
pub mod get;
pub mod inspect;
pub mod output;
pub mod tokens;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, anyhow};
use clap::{CommandFactory, Parser, Subcommand};

use crate::client::Client;
use crate::config::Config;
use crate::output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Manage a weft service mesh through its global control plane"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Config file [default: <config dir>/weft/weftctl.yaml]
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "WEFTCTL_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    /// Use this control plane from the config file instead of the current one.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "NAME"
    )]
    pub context: Option<String>,
    /// Talk to this control plane, ignoring the config file.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "WEFTCTL_ADDRESS",
        value_name = "URL"
    )]
    pub address: Option<String>,
    /// Use this API token instead of the stored one.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "WEFTCTL_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the control planes weftctl talks to.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Create or update resources from files, directories or stdin.
    Apply(apply::Args),
    /// Show one resource or list them.
    Get(get::GetArgs),
    /// Delete one resource.
    Delete(get::DeleteArgs),
    /// Show summaries computed by the control plane.
    Inspect {
        #[command(subcommand)]
        command: InspectCommand,
    },
    /// Generate zone tokens.
    Generate {
        #[command(subcommand)]
        command: tokens::Generate,
    },
    /// Revoke zone tokens.
    Revoke {
        #[command(subcommand)]
        command: tokens::Revoke,
    },
    /// Print a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Add, list, select and remove control planes.
    #[command(name = "control-planes")]
    ControlPlanes {
        #[command(subcommand)]
        command: ControlPlanesCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ControlPlanesCommand {
    /// Add a control plane and make it the current one.
    Add(AddArgs),
    /// List the configured control planes.
    List,
    /// Make a control plane the current one.
    Use { name: String },
    /// Forget a control plane.
    Remove { name: String },
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// A name for it, e.g. prod.
    #[arg(long)]
    pub name: String,
    /// Its API address, e.g. https://weft-global.example.com:5681.
    #[arg(long, value_name = "URL")]
    pub address: String,
    /// The API token (admin or read-only).
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// Read the API token from a file, e.g. <data-dir>/admin-token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Replace a control plane of the same name.
    #[arg(long)]
    pub overwrite: bool,
    /// Do not check that `GET /healthz` answers before saving.
    #[arg(long)]
    pub skip_verify: bool,
}

#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// Resource counts per mesh.
    Meshes {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Zones: online or offline, last seen, version, resources they sent (global only).
    Zones {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Dataplanes of a zone: online or offline, service, certificate expiry (zone control
    /// plane only).
    Dataplanes {
        /// The mesh.
        #[arg(short, long, default_value = weft_core::DEFAULT_MESH)]
        mesh: String,
        /// List across every mesh.
        #[arg(short = 'A', long, conflicts_with = "mesh")]
        all_meshes: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Services: the zones that run them, their instances, and (on a zone control plane) the
    /// VIP their `<service>.mesh` name resolves to.
    Services {
        /// The mesh.
        #[arg(short, long, default_value = weft_core::DEFAULT_MESH)]
        mesh: String,
        /// List across every mesh.
        #[arg(short = 'A', long, conflicts_with = "mesh")]
        all_meshes: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// One dataplane: with --config, the configuration its zone last sent it (zone control
    /// plane only).
    Dataplane {
        /// The dataplane's name.
        name: String,
        /// The mesh.
        #[arg(short, long, default_value = weft_core::DEFAULT_MESH)]
        mesh: String,
        /// Show the configuration the zone last sent (view, services and endpoints,
        /// certificate). Also spelled `--config` when no path follows it (the global
        /// `--config PATH` names weftctl's own config file).
        #[arg(long = "show-config", id = "show_config", required = true)]
        config: bool,
        /// Output format: json (default) or yaml.
        #[arg(short, long, value_enum, default_value_t = Format::Json)]
        output: Format,
    },
}

/// Parse the process arguments, run, print, and map the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_args(std::env::args_os().collect()));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush())
            {
                // `weftctl get ... | head` closing the pipe early is not an error.
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("Error: writing output: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `weftctl inspect dataplane NAME --config`: a `--config` with no value after it (last, or
/// followed by another flag) in `inspect dataplane` is the `--show-config` switch, not the
/// global `--config PATH` (clap cannot have both under one name).
pub fn normalize_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let words: Vec<Option<&str>> = args.iter().map(|a| a.to_str()).collect();
    let Some(at) = words
        .windows(2)
        .position(|w| w == [Some("inspect"), Some("dataplane")])
    else {
        return args;
    };
    let bare: Vec<usize> = (at + 2..words.len())
        .filter(|&i| {
            words[i] == Some("--config")
                && words
                    .get(i + 1)
                    .is_none_or(|next| next.is_none_or(|n| n.starts_with('-')))
        })
        .collect();
    for i in bare {
        args[i] = "--show-config".into();
    }
    args
}

/// Run one command; returns what to print on stdout.
pub async fn run(cli: Cli) -> Result<String> {
    let g = &cli.global;
    let config_path = || match &g.config {
        Some(p) => Ok(p.clone()),
        None => config::default_path(),
    };
    let connect = || -> Result<Client> {
        // With --address the config file is not read at all.
        let cfg = if g.address.is_some() {
            Config::default()
        } else {
            Config::load(&config_path()?)?
        };
        let target = cfg.target(
            g.context.as_deref(),
            g.address.as_deref(),
            g.token.as_deref(),
        )?;
        Client::new(&target)
    };
    match &cli.command {
        Command::Config {
            command: ConfigCommand::ControlPlanes { command },
        } => control_planes(&config_path()?, command).await,
        Command::Apply(args) => apply::run(&connect()?, args).await,
        Command::Get(args) => get::run(&connect()?, args).await,
        Command::Delete(args) => get::delete(&connect()?, args).await,
        Command::Inspect {
            command: InspectCommand::Meshes { output },
        } => inspect::meshes(&connect()?, *output).await,
        Command::Inspect {
            command: InspectCommand::Zones { output },
        } => inspect::zones(&connect()?, *output).await,
        Command::Inspect {
            command:
                InspectCommand::Dataplanes {
                    mesh,
                    all_meshes,
                    output,
                },
        } => {
            let mesh = (!*all_meshes).then_some(mesh.as_str());
            inspect::dataplanes(&connect()?, mesh, *output).await
        }
        Command::Inspect {
            command:
                InspectCommand::Services {
                    mesh,
                    all_meshes,
                    output,
                },
        } => {
            let mesh = (!*all_meshes).then_some(mesh.as_str());
            inspect::services(&connect()?, mesh, *output).await
        }
        Command::Inspect {
            command:
                InspectCommand::Dataplane {
                    name, mesh, output, ..
                },
        } => inspect::dataplane_config(&connect()?, mesh, name, *output).await,
        Command::Generate { command } => tokens::generate(&connect()?, command).await,
        Command::Revoke { command } => tokens::revoke(&connect()?, command).await,
        Command::Completion { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "weftctl", &mut buf);
            String::from_utf8(buf).context("completion script is not UTF-8")
        }
    }
}

async fn control_planes(path: &std::path::Path, command: &ControlPlanesCommand) -> Result<String> {
    let mut cfg = Config::load(path)?;
    let out = match command {
        ControlPlanesCommand::Add(args) => {
            let address = config::normalize_address(&args.address)?;
            let token = match (&args.token, &args.token_file) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(f)) => {
                    let t = std::fs::read_to_string(f)
                        .with_context(|| format!("--token-file {}", f.display()))?;
                    let t = t.trim();
                    if t.is_empty() {
                        return Err(anyhow!("--token-file {}: the file is empty", f.display()));
                    }
                    Some(t.to_string())
                }
                (None, None) => None,
            };
            let context = config::Context {
                name: args.name.clone(),
                address: address.clone(),
                token,
            };
            // Refuse a duplicate before touching the network.
            cfg.clone().add(context.clone(), args.overwrite)?;
            if !args.skip_verify {
                let client = Client::new(&config::Target {
                    address: address.clone(),
                    token: None,
                })?;
                client.healthz().await.map_err(|e| {
                    anyhow!("{e:#}\ncontrol plane {address} failed `GET /healthz`; pass --skip-verify to add it anyway")
                })?;
            }
            cfg.add(context, args.overwrite)?;
            cfg.save(path)?;
            format!(
                "added control plane {:?} ({address}) and made it current\n",
                args.name
            )
        }
        ControlPlanesCommand::List => return Ok(cfg.table()),
        ControlPlanesCommand::Use { name } => {
            cfg.switch(name)?;
            cfg.save(path)?;
            format!("switched to control plane {name:?}\n")
        }
        ControlPlanesCommand::Remove { name } => {
            cfg.remove(name)?;
            cfg.save(path)?;
            format!("removed control plane {name:?}\n")
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn add_takes_its_own_address_and_token() {
        let cli = Cli::try_parse_from([
            "weftctl",
            "config",
            "control-planes",
            "add",
            "--name",
            "prod",
            "--address",
            "http://x:5681",
            "--token",
            "t",
        ])
        .unwrap();
        let Command::Config {
            command:
                ConfigCommand::ControlPlanes {
                    command: ControlPlanesCommand::Add(a),
                },
        } = cli.command
        else {
            panic!("parsed {:?}", cli.command)
        };
        assert_eq!(
            (a.name.as_str(), a.address.as_str(), a.token.as_deref()),
            ("prod", "http://x:5681", Some("t"))
        );
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from([
            "weftctl",
            "get",
            "meshtimeouts",
            "--address",
            "http://x:1",
            "-A",
        ])
        .unwrap();
        assert_eq!(cli.global.address.as_deref(), Some("http://x:1"));
        let Command::Get(g) = cli.command else {
            panic!()
        };
        assert!(g.all_meshes);
        assert!(
            Cli::try_parse_from(["weftctl", "get", "meshtimeouts", "t", "-A"]).is_err(),
            "-A with a name"
        );
    }

    #[test]
    fn inspect_dataplane_takes_config_as_a_switch() {
        let argv = |a: &[&str]| normalize_args(a.iter().map(Into::into).collect());
        let cli = Cli::try_parse_from(argv(&[
            "weftctl",
            "inspect",
            "dataplane",
            "web-1",
            "--mesh",
            "m",
            "--config",
            "-o",
            "yaml",
        ]))
        .unwrap();
        let Command::Inspect {
            command:
                InspectCommand::Dataplane {
                    name,
                    mesh,
                    config,
                    output,
                },
        } = cli.command
        else {
            panic!("parsed {:?}", cli.command)
        };
        assert_eq!(
            (name.as_str(), mesh.as_str(), config, output),
            ("web-1", "m", true, Format::Yaml)
        );
        assert_eq!(cli.global.config, None);
        // Last on the line, too; and a --config with a path stays weftctl's config file.
        let cli = Cli::try_parse_from(argv(&[
            "weftctl",
            "--config",
            "/tmp/w.yaml",
            "inspect",
            "dataplane",
            "web-1",
            "--config",
        ]))
        .unwrap();
        assert_eq!(cli.global.config, Some(PathBuf::from("/tmp/w.yaml")));
        assert!(matches!(
            cli.command,
            Command::Inspect {
                command: InspectCommand::Dataplane { config: true, .. }
            }
        ));
        assert!(Cli::try_parse_from(["weftctl", "inspect", "dataplane", "web-1"]).is_err());
        assert!(
            Cli::try_parse_from(["weftctl", "inspect", "dataplanes", "-A", "--mesh", "m"]).is_err()
        );
    }
}
