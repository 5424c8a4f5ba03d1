//! `ferry`: the command line (vmm/src/cli/). Prints for people; errors are one line on
//! stderr and a non-zero exit status.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match cli::dispatch(cli::args::Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
