//! `ferry`: the command line (vmm/src/cli/). Prints for people; errors are one line on
//! stderr and a non-zero exit status.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

mod cli;

fn main() -> ExitCode {
    vmm::timeline::mark("main");
    let args = match cli::args::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => return bad_arguments(e),
    };
    // RUST_LOG, else warnings; --log-level or -v over both.
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if let Some(level) = args.log_filter() {
        logger.filter_level(level);
    }
    logger.init();
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Help as clap prints it; the version as `ferry VERSION` (after a subcommand too); any
/// other argument error as one line, status 1.
fn bad_arguments(e: clap::Error) -> ExitCode {
    if e.kind() == ErrorKind::DisplayVersion {
        println!("ferry {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    eprintln!("ferry: error: {}", one_line(&e.render().to_string()));
    ExitCode::FAILURE
}

/// clap's message as one line: its first line, and where that ends with a colon (the
/// required arguments missing), the indented lines that name them.
fn one_line(text: &str) -> String {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("bad arguments");
    let mut line = first.trim_start_matches("error: ").to_string();
    if line.ends_with(':') {
        let named: Vec<&str> = lines
            .take_while(|l| l.starts_with(' '))
            .map(str::trim)
            .collect();
        line = format!("{line} {}", named.join(", "));
    }
    line
}
