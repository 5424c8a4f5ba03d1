//! `ferry`: the command line (vmm/src/cli/). Prints for people; errors are one line on
//! stderr and a non-zero exit status.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

mod cli;

fn main() -> ExitCode {
    vmm::timeline::mark("main");
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = match cli::args::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => return bad_arguments(e),
    };
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Help and version as clap prints them; any other argument error as one line, status 1.
fn bad_arguments(e: clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("bad arguments");
    eprintln!("ferry: error: {}", first.trim_start_matches("error: "));
    ExitCode::FAILURE
}
