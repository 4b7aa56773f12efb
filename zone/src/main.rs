//! weft-zone: parse the command line, set up logging, call into the library.

use clap::Parser;
use tokio_util::sync::CancellationToken;
use weft_zone::config::{Cli, Command, Config, LogFormat};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Cli {
        command: Command::Run(args),
    } = Cli::parse();
    let result = match Config::resolve(args) {
        Ok(cfg) => {
            init_logs(cfg.log_format);
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            weft_zone::run(cfg, shutdown).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-zone: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    shutdown.cancel();
}
