//! weft-global: parse the command line, set up logging, call into the library.

use clap::Parser;
use weft_global::config::{Cli, Command, Config, LogFormat, TokenCommand};
use weft_global::process::{init_logs, shutdown_on_signal};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => match Config::resolve(args) {
            Ok(cfg) => {
                init_logs(cfg.log_format);
                let shutdown = shutdown_on_signal();
                weft_global::run(cfg, shutdown).await
            }
            Err(e) => Err(e),
        },
        Command::Migrate(db) => {
            init_logs(LogFormat::Text);
            weft_global::migrate(&db.postgres_url).await
        }
        Command::Token {
            command: TokenCommand::Rotate { role, db },
        } => {
            init_logs(LogFormat::Text);
            weft_global::rotate_token(&db.postgres_url, role)
                .await
                .map(|t| println!("{t}"))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-global: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
