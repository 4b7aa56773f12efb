//! weft-zone: parse the command line, set up logging, call into the library.

use clap::Parser;
use weft_global::process::{init_logs, shutdown_on_signal};
use weft_zone::config::{Cli, Command, Config};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Cli {
        command: Command::Run(args),
    } = Cli::parse();
    let result = match Config::resolve(args) {
        Ok(cfg) => {
            init_logs(cfg.log_format);
            let shutdown = shutdown_on_signal();
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
