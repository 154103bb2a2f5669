//! `confab`: one binary for every role. `main` only parses the command line, sets up logging
//! and hands over to the subcommand.

mod cli;
mod ctl;
mod dev;
mod distributed;
mod durability;
mod inproc;
mod listen;
mod metrics_upkeep;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    init_tracing();
    let outcome = match cli.command {
        cli::Command::Dev(args) => dev::run(args),
        cli::Command::Gateway(args) => distributed::run_gateway(args),
        cli::Command::Cell(args) => distributed::run_cell(args),
        cli::Command::Ctl(args) => ctl::run(args),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confab: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONFAB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
