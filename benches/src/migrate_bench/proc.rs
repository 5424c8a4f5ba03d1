//! A VMM process with time-stamped output and heartbeats, and what a benchmark guest does.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::*;

/// Heartbeat bytes with their arrival times.
pub(crate) type Beats = Arc<Mutex<Vec<(Instant, u8)>>>;
/// A case on one VMM: the heartbeat interval achieved, and the samples per mode.
pub(crate) type CaseResult = (f64, Vec<(Mode, Vec<Option<Sample>>)>);

/// A VMM process whose output lines and heartbeat bytes are time-stamped as they arrive.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) lines: Arc<Mutex<Vec<(Instant, String)>>>,
    pub(crate) beats: Beats,
}

/// A FIFO for a VMM's debug console and a thread recording each byte with its arrival time.
pub(crate) fn debug_fifo(name: &str) -> Result<(PathBuf, Beats)> {
    let path = temp(name);
    let _ = std::fs::remove_file(&path);
    let ok = Command::new("mkfifo").arg(&path).status()?.success();
    if !ok {
        bail!("mkfifo {}", path.display());
    }
    let beats = Arc::new(Mutex::new(Vec::new()));
    let (p, b) = (path.clone(), beats.clone());
    std::thread::spawn(move || {
        use std::io::Read;
        let Ok(mut f) = std::fs::File::open(&p) else {
            return;
        };
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = f.read(&mut buf) {
            let now = Instant::now();
            b.lock().unwrap().extend(buf[..n].iter().map(|x| (now, *x)));
        }
    });
    Ok((path, beats))
}

impl Proc {
    /// Spawns `cmd`, which must send its debug console to the FIFO made by [`debug_fifo`].
    pub(crate) fn spawn(cmd: &mut Command, beats: Beats) -> Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stdout.take().context("stdout")?) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().context("stderr")?),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    lines.lock().unwrap().push((Instant::now(), line));
                }
            });
        }
        Ok(Proc {
            child,
            lines,
            beats,
        })
    }

    /// Waits until `n` heartbeats have arrived.
    pub(crate) fn wait_beats(&self, n: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.beats.lock().unwrap().len() < n {
            if Instant::now() > deadline {
                bail!("timed out waiting for {n} heartbeats");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Waits for a line matching `pred` at or after index `from`; returns its index and time.
    pub(crate) fn wait_line(
        &self,
        from: usize,
        limit: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, Instant)> {
        let deadline = Instant::now() + limit;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if let Some(i) = (from..lines.len()).find(|i| pred(&lines[*i].1)) {
                    return Ok((i, lines[i].0));
                }
            }
            if Instant::now() > deadline {
                let tail: Vec<String> = self
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .take(5)
                    .map(|l| l.1.clone())
                    .collect();
                bail!("timed out waiting for {what}; last lines: {tail:?}");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Median interval between the last `n` heartbeats, ms.
    pub(crate) fn heartbeat_interval_ms(&self, n: usize) -> f64 {
        let beats = self.beats.lock().unwrap();
        let t: Vec<Instant> = beats.iter().map(|(t, _)| *t).collect();
        let t = &t[t.len().saturating_sub(n)..];
        let d: Vec<f64> = t
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
            .collect();
        if d.is_empty() {
            f64::NAN
        } else {
            stats(&d).1
        }
    }

    pub(crate) fn wait_exit(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("process did not exit");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-migrate-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}

/// Boots the guest and waits until it heartbeats; the storm guest must say that all of the
/// case's vCPUs came up.
pub(crate) fn boot(p: &Proc, case: &Case) -> Result<()> {
    let (i, _) = p.wait_line(0, BOOT_LIMIT, "GUEST-READY", |l| l.contains("GUEST-READY"))?;
    if case.guest == CaseGuest::Storm {
        let line = p.lines.lock().unwrap()[i].1.clone();
        if !line.contains(&format!("cpus={}", case.vcpus)) {
            bail!(
                "{}: {} vCPUs asked for, the guest says {line:?}",
                case.name,
                case.vcpus
            );
        }
    }
    // A little steady state (the dirtying workload's first passes).
    p.wait_beats(500, BOOT_LIMIT)
}

/// Heartbeats a guest gives at its current host before it is migrated again: a guest that
/// just arrived runs slowly for a while (on hosts that emulate guest ring 0, its kernel's
/// memory is mapped anew page by page), and a blackout measured then would be that
/// warm-up, not the migration's.
pub(crate) const SETTLE_BEATS: usize = 50;

/// Waits for [`SETTLE_BEATS`] more heartbeats at `p`.
pub(crate) fn settle(p: &Proc) -> Result<()> {
    let n = p.beats.lock().unwrap().len();
    p.wait_beats(n + SETTLE_BEATS, MIGRATION_LIMIT)
}

/// Blackout: from the source's last heartbeat to the destination's first. Heartbeats go on
/// by one across the move (their low byte), or the run is reported.
pub(crate) fn blackout(src: &Proc, dst: &Proc) -> Result<f64> {
    dst.wait_beats(1, MIGRATION_LIMIT)?;
    let (first, b) = dst.beats.lock().unwrap()[0];
    let (last, a) = *src
        .beats
        .lock()
        .unwrap()
        .last()
        .context("no heartbeat at the source")?;
    if b != a.wrapping_add(1) {
        eprintln!("heartbeat {a} at the source, then {b} at the destination");
    }
    Ok(first.saturating_duration_since(last).as_secs_f64() * 1e3)
}

/// A case's guest under one VMM, kept running across its migrations.
pub(crate) trait Guest {
    /// The process that holds the guest now.
    fn src(&self) -> &Proc;
    /// Pauses or resumes the guest's vCPUs.
    fn run(&mut self, on: bool) -> Result<()>;
    /// One migration to a new process, which then holds the guest; None if it did not
    /// finish (the guest stays where it was).
    fn migrate(&mut self, case: &Case, mode: &Mode, run: usize) -> Result<Option<Sample>>;
}
