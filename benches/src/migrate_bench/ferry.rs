//! A case's guest under ferry: `ferry run`, `ferry receive`, `ferry ctl migrate`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};
use serde_json::Value;

use super::*;

/// A case's guest under ferry, kept running across its migrations: `src` is the process
/// that holds it now, listening on API socket `n`.
pub(crate) struct FerryGuest {
    pub(crate) ferry: PathBuf,
    pub(crate) src: Proc,
    pub(crate) n: usize,
}

impl FerryGuest {
    pub(crate) fn sock(n: usize) -> PathBuf {
        temp(&format!("ferry-{n}.sock"))
    }

    pub(crate) fn boot(ferry: &Path, case: &Case) -> Result<FerryGuest> {
        let (kernel, initrd, cmdline) = boot_files(case);
        let (fifo, beats) = debug_fifo("ferry-0.hb")?;
        let mut cmd = Command::new(ferry);
        cmd.arg("run").arg("--kernel").arg(&kernel);
        if let Some(initrd) = &initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        let vcpus = case.vcpus.to_string();
        cmd.args(["--memory", case.memory, "--vcpus", &vcpus, "--cmdline"])
            .arg(&cmdline)
            .arg("--api-socket")
            .arg(Self::sock(0))
            .arg("--debug-console")
            .arg(fifo);
        let src = Proc::spawn(&mut cmd, beats)?;
        boot(&src, case)?;
        Ok(FerryGuest {
            ferry: ferry.to_path_buf(),
            src,
            n: 0,
        })
    }

    pub(crate) fn ctl(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(&self.ferry)
            .arg("ctl")
            .arg("--api-socket")
            .arg(Self::sock(self.n))
            .args(args)
            .output()?)
    }
}

impl Guest for FerryGuest {
    fn src(&self) -> &Proc {
        &self.src
    }

    fn run(&mut self, on: bool) -> Result<()> {
        let o = self.ctl(&[if on { "resume" } else { "pause" }])?;
        if !o.status.success() {
            bail!("ferry ctl: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(())
    }

    fn migrate(&mut self, case: &Case, mode: &Mode, run: usize) -> Result<Option<Sample>> {
        let Mode::Ferry(_, extra) = mode else {
            unreachable!()
        };
        let n = self.n + 1;
        let url = format!("tcp:127.0.0.1:{}", free_port()?);
        let (fifo, beats) = debug_fifo(&format!("ferry-{n}.hb"))?;
        let tls = tls_dir();
        let extra: Vec<&str> = extra
            .iter()
            .map(|a| {
                if *a == TLS_DIR {
                    tls.to_str().unwrap_or_default()
                } else {
                    a
                }
            })
            .collect();
        let mut receive = Command::new(&self.ferry);
        receive
            .args(["receive", "--listen", &url, "--api-socket"])
            .arg(Self::sock(n))
            .arg("--debug-console")
            .arg(fifo);
        if extra.contains(&"--tls-dir") {
            receive.arg("--tls-dir").arg(&tls);
        }
        let dst = Proc::spawn(&mut receive, beats)?;
        dst.wait_line(0, MIGRATION_LIMIT, "the destination", |l| {
            l.contains("waiting for a VM")
        })?;
        let mut args = vec!["--json", "migrate", &url, "--timeout", "30s"];
        args.extend_from_slice(&extra);
        let o = self.ctl(&args)?;
        let answer: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let r = &answer["report"];
        if answer["ok"] != true {
            eprintln!(
                "{}, {}: run {run}: {}",
                case.name,
                mode.name(),
                String::from_utf8_lossy(&o.stdout)
            );
            return Ok(None);
        }
        self.src.wait_exit(MIGRATION_LIMIT)?;
        let s = Sample {
            total_ms: r["total_ms"].as_f64().unwrap_or(f64::NAN),
            downtime_ms: r["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            blackout_ms: blackout(&self.src, &dst)?,
            bytes: r["bytes"].as_f64().unwrap_or(f64::NAN),
            rounds: r["rounds"].as_f64().unwrap_or(f64::NAN),
        };
        eprintln!(
            "{}, {}: run {run}: {s:?}; handshake {} ms, rounds {} ms, downtime {}",
            case.name,
            mode.name(),
            r["handshake_ms"],
            r["round_ms"],
            r["downtime_phases"]
        );
        self.src = dst;
        self.n = n;
        Ok(Some(s))
    }
}
