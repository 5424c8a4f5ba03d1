//! A case's guest under QEMU, driven over QMP.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::*;

/// A QMP connection.
pub(crate) struct Qmp {
    pub(crate) r: BufReader<UnixStream>,
    pub(crate) w: UnixStream,
}

impl Qmp {
    pub(crate) fn connect(path: &Path) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(e).with_context(|| format!("QMP {}", path.display())),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.exec("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    pub(crate) fn exec(&mut self, cmd: &str, args: Value) -> Result<Value> {
        writeln!(self.w, "{}", json!({"execute": cmd, "arguments": args}))?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                bail!("QMP closed during {cmd}");
            }
            let v: Value = serde_json::from_str(&line)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
        }
    }
}

pub(crate) fn qemu_cmd(case: &Case, qmp: &Path, debugcon: &Path, incoming: bool) -> Command {
    let (kernel, initrd, cmdline) = boot_files(case);
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host"])
        .args(["-m", case.memory, "-smp", &case.vcpus.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel);
    if let Some(initrd) = &initrd {
        c.arg("-initrd").arg(initrd).arg("-append").arg(&cmdline);
    }
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-debugcon")
        .arg(format!("file:{}", debugcon.display()));
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    c
}

pub(crate) fn qemu_setup(q: &mut Qmp, mode: &Mode) -> Result<()> {
    let Mode::Qemu {
        unthrottled,
        downtime_ms,
        capability,
        ..
    } = *mode
    else {
        unreachable!()
    };
    let caps: Vec<Value> = ["auto-converge", "multifd", "postcopy-ram"]
        .iter()
        .map(|c| json!({"capability": c, "state": capability == Some(*c)}))
        .collect();
    q.exec("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    let mut params = json!({"downtime-limit": downtime_ms.unwrap_or(300), "multifd-channels": 2, "tls-creds": ""});
    // QEMU 7.2's default is 32 MiB/s.
    params["max-bandwidth"] = json!(if unthrottled {
        1_000_000_000_000u64
    } else {
        32u64 << 20
    });
    q.exec("migrate-set-parameters", params)?;
    Ok(())
}

/// Adds x509 credentials `id` on this run's certificates ([`tls_dir`]) as `endpoint`
/// (server: the destination, client: the source; each checks the other's certificate)
/// and makes them the migration's.
fn tls_creds(q: &mut Qmp, id: &str, endpoint: &str) -> Result<()> {
    q.exec(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": id, "dir": tls_dir(), "endpoint": endpoint, "verify-peer": true}),
    )?;
    q.exec("migrate-set-parameters", json!({ "tls-creds": id }))?;
    Ok(())
}

/// A case's guest under QEMU, kept running across its migrations.
pub(crate) struct QemuGuest {
    pub(crate) src: Proc,
    pub(crate) qmp: Qmp,
    pub(crate) n: usize,
}

impl QemuGuest {
    pub(crate) fn qmp_path(n: usize) -> PathBuf {
        temp(&format!("qemu-{n}.qmp"))
    }

    pub(crate) fn boot(case: &Case) -> Result<QemuGuest> {
        let (fifo, beats) = debug_fifo("qemu-0.hb")?;
        let src = Proc::spawn(&mut qemu_cmd(case, &Self::qmp_path(0), &fifo, false), beats)?;
        let qmp = Qmp::connect(&Self::qmp_path(0))?;
        boot(&src, case)?;
        Ok(QemuGuest { src, qmp, n: 0 })
    }
}

impl Guest for QemuGuest {
    fn src(&self) -> &Proc {
        &self.src
    }

    fn run(&mut self, on: bool) -> Result<()> {
        self.qmp.exec(if on { "cont" } else { "stop" }, json!({}))?;
        Ok(())
    }

    /// A migration that does not finish in time is cancelled; the guest runs on.
    fn migrate(&mut self, case: &Case, mode: &Mode, run: usize) -> Result<Option<Sample>> {
        let n = self.n + 1;
        let (fifo, beats) = debug_fifo(&format!("qemu-{n}.hb"))?;
        let dst = Proc::spawn(&mut qemu_cmd(case, &Self::qmp_path(n), &fifo, true), beats)?;
        let mut dst_qmp = Qmp::connect(&Self::qmp_path(n))?;
        qemu_setup(&mut dst_qmp, mode)?;
        if matches!(mode, Mode::Qemu { tls: true, .. }) {
            tls_creds(&mut dst_qmp, &format!("tls-in-{n}"), "server")?;
            tls_creds(&mut self.qmp, &format!("tls-out-{n}"), "client")?;
        }
        let uri = format!("tcp:127.0.0.1:{}", free_port()?);
        dst_qmp.exec("migrate-incoming", json!({ "uri": uri }))?;
        qemu_setup(&mut self.qmp, mode)?;
        if matches!(mode, Mode::Qemu { tls: true, .. }) {
            let params = json!({"tls-creds": format!("tls-out-{n}"), "tls-hostname": "127.0.0.1"});
            self.qmp.exec("migrate-set-parameters", params)?;
        }
        self.qmp.exec("migrate", json!({ "uri": uri }))?;
        let deadline = Instant::now() + MIGRATION_LIMIT;
        // Postcopy once the first full pass is done (QEMU counts it as the second sync).
        let mut postcopy_due = matches!(
            mode,
            Mode::Qemu {
                capability: Some("postcopy-ram"),
                ..
            }
        );
        let info = loop {
            let info = self.qmp.exec("query-migrate", json!({}))?;
            if postcopy_due && info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 {
                self.qmp.exec("migrate-start-postcopy", json!({}))?;
                postcopy_due = false;
            }
            match info["status"].as_str() {
                Some("completed") => break Some(info),
                Some("failed") | Some("cancelled") => bail!("QEMU migration: {info}"),
                _ if Instant::now() > deadline => break None,
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let Some(info) = info else {
            eprintln!(
                "{}, {}: run {run}: did not finish in {MIGRATION_LIMIT:?}",
                case.name,
                mode.name()
            );
            cancel(&mut self.qmp)?;
            return Ok(None);
        };
        let s = Sample {
            total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
            downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
            blackout_ms: blackout(&self.src, &dst)?,
            bytes: info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN),
            rounds: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
        };
        eprintln!("{}, {}: run {run}: {s:?}", case.name, mode.name());
        let _ = self.qmp.exec("quit", json!({}));
        self.src = dst;
        self.qmp = dst_qmp;
        self.n = n;
        Ok(Some(s))
    }
}

/// Cancels the migration under way and waits until the source runs again.
fn cancel(qmp: &mut Qmp) -> Result<()> {
    qmp.exec("migrate_cancel", json!({}))?;
    let deadline = Instant::now() + MIGRATION_LIMIT;
    while qmp.exec("query-status", json!({}))?["status"] != "running" {
        if Instant::now() > deadline {
            bail!("QEMU did not run again after migrate_cancel");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
