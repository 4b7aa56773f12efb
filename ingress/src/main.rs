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

/// `pow(3)` from the pure-Rust `libm` crate, so the binary does not load glibc's libm.so
/// for the one function tokio's multi-threaded scheduler links (see weft-dp's `pow`).
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

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
    // `Targets` (target=level lists) rather than `EnvFilter`: a proxy needs no span-field
    // filters, and EnvFilter links the regex engine, which costs the sidecar's resident memory.
    let directives: Vec<&str> = cfg
        .log_level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let filter: tracing_subscriber::filter::Targets = directives
        .join(",")
        .parse()
        .map_err(|e| anyhow::anyhow!("--log-level {:?}: {e}", cfg.log_level))?;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match cfg.log_format {
        LogFormat::Text => registry.with(layer).init(),
        LogFormat::Json => registry.with(layer.json()).init(),
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
