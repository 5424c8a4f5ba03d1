//! The `ferry` command line: arguments ([`args`]), the VM-running commands ([`run`],
//! [`receive`], [`serve`]), the control-socket client ([`ctl`]) and the CPU model commands
//! ([`cpu`]). Prints for people;
//! errors are one line on stderr and a non-zero exit status.

pub mod args;
pub mod cpu;
pub mod ctl;
pub mod receive;
pub mod run;
pub mod serve;

use std::process::ExitCode;

use args::{Cli, Cmd};

/// Runs one command line.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Ctl(a) => ctl::ctl(a),
        Cmd::Restore(a) => run::restore(a),
        Cmd::Receive(a) => receive::receive(a),
        Cmd::Serve(a) => serve::serve(a),
        Cmd::Cpu(c) => cpu::run(c),
        Cmd::Key(args::KeyCmd::Generate { file }) => {
            vmm::migrate::key::generate(&file)?;
            eprintln!("ferry: wrote a new key to {} (mode 0600)", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tls(args::TlsCmd::Generate {
            dir,
            names,
            source_name,
            days,
            ca_key,
        }) => {
            let g = vmm::migrate::TlsGenerate {
                ca_key: ca_key.unwrap_or_else(|| vmm::migrate::TlsGenerate::default_ca_key(&dir)),
                names,
                source_name,
                days,
            };
            vmm::migrate::tls_generate(&dir, &g)?;
            eprintln!(
                "ferry: wrote a CA, a destination certificate for {} and a source certificate for {} to {}, valid {} days (keys mode 0600); the CA key is {}: keep it off both hosts",
                g.names.join(", "),
                g.source_name,
                dir.display(),
                g.days,
                g.ca_key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The error and its causes on one line, each cause once: most messages already include
/// their cause's text, which the chain would repeat.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::args::Cli;

    /// The `ferry` command lines of README.md and docs/ (lines that start with `ferry VERB`,
    /// `$ ferry VERB` or `target/release/ferry VERB`; `\` continues a line, ` # ` starts a
    /// comment).
    fn documented() -> Vec<(String, String)> {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut files = vec![format!("{root}/README.md")];
        for e in std::fs::read_dir(format!("{root}/docs")).unwrap() {
            files.push(e.unwrap().path().display().to_string());
        }
        let mut out = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let mut lines = text.lines();
            while let Some(l) = lines.next() {
                let mut cmd = l.trim().to_string();
                while cmd.ends_with('\\') {
                    cmd.pop();
                    cmd.push(' ');
                    cmd.push_str(lines.next().unwrap_or("").trim());
                }
                let cmd = cmd.strip_prefix("$ ").unwrap_or(&cmd).to_string();
                let cmd = cmd
                    .strip_prefix("target/release/")
                    .unwrap_or(&cmd)
                    .to_string();
                let cmd = cmd.split(" # ").next().unwrap_or("").trim().to_string();
                let verbs = ["run", "ctl", "restore", "receive", "cpu", "serve"];
                if verbs
                    .iter()
                    .any(|v| cmd.starts_with(&format!("ferry {v} ")))
                {
                    out.push((f.clone(), cmd));
                }
            }
        }
        out
    }

    /// Words as a shell splits them (double quotes group).
    fn words(cmd: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        for c in cmd.chars() {
            match c {
                '"' => quoted = !quoted,
                ' ' if !quoted => {
                    if !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                    }
                }
                c => cur.push(c),
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// The concrete command lines a synopsis stands for: every `[optional]` group left out
    /// and all put in, and each alternative of `a|b|c` in turn; `HOST...` is one HOST.
    fn expand(cmd: &str) -> Vec<Vec<String>> {
        let ws = words(cmd);
        let mut variants = Vec::new();
        for with_optional in [false, true] {
            let mut base: Vec<String> = Vec::new();
            let mut depth = 0;
            for w in &ws {
                let opens = w.starts_with('[');
                if opens {
                    depth += 1;
                }
                let closes = w.ends_with(']');
                let word = w.trim_start_matches('[').trim_end_matches(']');
                if depth == 0 || with_optional {
                    base.push(word.trim_end_matches("...").to_string());
                }
                if closes {
                    depth -= 1;
                }
            }
            let alternatives = base.iter().map(|w| w.split('|').count()).max().unwrap_or(1);
            for k in 0..alternatives {
                variants.push(
                    base.iter()
                        .map(|w| {
                            let alts: Vec<&str> = w.split('|').collect();
                            alts[k.min(alts.len() - 1)].to_string()
                        })
                        .collect(),
                );
            }
        }
        variants
    }

    #[test]
    fn every_documented_command_line_parses() {
        let cmds = documented();
        assert!(cmds.len() >= 12, "{} command lines found", cmds.len());
        let mut checked = 0;
        for (file, cmd) in &cmds {
            for argv in expand(cmd) {
                if let Err(e) = Cli::try_parse_from(&argv) {
                    panic!("{file}: {cmd}\nas {argv:?}:\n{e}");
                }
                checked += 1;
            }
        }
        assert!(checked > 30, "{checked} lines");
    }

    #[test]
    fn json_goes_before_or_after_the_command() {
        for argv in [
            "ferry ctl --api-socket s --json status",
            "ferry ctl --api-socket s status --json",
            "ferry ctl --api-socket s migrate tcp:h:1 --max-downtime 5ms --json",
        ] {
            let cli = Cli::try_parse_from(argv.split(' ')).unwrap();
            match cli.cmd {
                super::args::Cmd::Ctl(a) => assert!(a.json, "{argv}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(Cli::try_parse_from("ferry ctl --api-socket s status --jsn".split(' ')).is_err());
    }
}
