//! weft-ingress: parse the flags, build the runtime (one thread unless `--threads`), bind the
//! listeners, turn SIGTERM/SIGINT into the drain (a second signal cuts it short), and call
//! [`weft_ingress::serve`].

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use weft_ingress::Shutdown;
use weft_ingress::config::{Cli, Command, Config, LogFormat};

fn main() -> ExitCode {
    let args = match Cli::parse().command {
        Command::Version => {
            println!("weft-ingress {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Run(args) => *args,
    };
    // Nothing starts unless the flags and files are right.
    let cfg = match Config::load(args).and_then(|cfg| init_tracing(&cfg).map(|()| cfg)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("weft-ingress: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = if cfg.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(cfg.threads))
            .enable_all()
            .build()
    };
    let result = runtime
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(cfg)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(cfg: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .map_err(|e| anyhow::anyhow!("--log-level {:?}: {e}", cfg.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let traffic = TcpListener::bind(cfg.address)
        .await
        .with_context(|| format!("--address {}: binding", cfg.address))?;
    let admin = TcpListener::bind(cfg.admin_address)
        .await
        .with_context(|| format!("--admin-address {}: binding", cfg.admin_address))?;
    let shutdown = Shutdown::default();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        for step in [&signals.drain, &signals.cut] {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "signal");
            step.cancel();
        }
    });
    weft_ingress::serve(cfg, traffic, admin, shutdown).await
}
