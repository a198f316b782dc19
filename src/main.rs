//! The `tollgate` binary: parse the command line, start logging, run.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = tollgate::cli::Cli::parse();
    let telemetry = tollgate::telemetry::init(&tollgate::config::log_settings(&tollgate::config::process_env));
    let code = match tollgate::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
