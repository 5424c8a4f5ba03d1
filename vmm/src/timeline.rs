//! Start-up milestones: from `main` to the first KVM_RUN, for `--timeline` and the restore
//! benchmark (benches/src/restore_bench.rs). Each milestone is a CLOCK_MONOTONIC reading
//! (comparable with another process's, so a parent can add the exec before `main`); the
//! line printed at the first KVM_RUN also gives the process's CPU time since exec.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static MARKS: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());
static PRINT: AtomicBool = AtomicBool::new(false);
static FIRST_RUN: AtomicBool = AtomicBool::new(false);

/// CLOCK_MONOTONIC in seconds (the vDSO: no system call): the clock of the milestones, for
/// a parent process to compare its own readings with.
pub fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The process's user and system CPU time since exec, in seconds, all threads.
fn cpu_time() -> (f64, f64) {
    // SAFETY: getrusage writes one rusage into the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

/// Records milestone `name` now.
pub fn mark(name: &'static str) {
    let t = monotonic();
    if let Ok(mut m) = MARKS.lock() {
        if m.len() < 64 {
            m.push((name, t));
        }
    }
}

/// Prints the milestones when the first vCPU first enters the guest.
pub fn print_at_first_run() {
    PRINT.store(true, Ordering::Relaxed);
}

/// Called by every vCPU thread before each entry into the guest until one has: the first
/// call records "first KVM_RUN" and, if asked, prints the line.
pub fn first_run() {
    if FIRST_RUN.load(Ordering::Relaxed) || FIRST_RUN.swap(true, Ordering::Relaxed) {
        return;
    }
    mark("first KVM_RUN");
    if PRINT.load(Ordering::Relaxed) {
        let (user, system) = cpu_time();
        eprintln!("ferry: timeline: {}", line(&marks(), user, system));
    }
}

fn marks() -> Vec<(&'static str, f64)> {
    MARKS.lock().map(|m| m.clone()).unwrap_or_default()
}

/// `main at 123.456789 s (CLOCK_MONOTONIC); kvm 0.41 ms, ...; CPU 2.10 ms (user 0.80,
/// system 1.30)`: each milestone in ms after the first.
fn line(marks: &[(&'static str, f64)], user: f64, system: f64) -> String {
    let Some(&(first, t0)) = marks.first() else {
        return "no milestones".into();
    };
    let rest: Vec<String> = marks[1..]
        .iter()
        .map(|(name, t)| format!("{name} {:.2} ms", (t - t0) * 1e3))
        .collect();
    format!(
        "{first} at {t0:.6} s (CLOCK_MONOTONIC); {}; CPU {:.2} ms (user {:.2}, system {:.2})",
        rest.join(", "),
        (user + system) * 1e3,
        user * 1e3,
        system * 1e3
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_gives_each_milestone_after_the_first() {
        let l = line(
            &[("main", 10.0), ("kvm", 10.0005), ("first KVM_RUN", 10.003)],
            0.001,
            0.002,
        );
        assert_eq!(
            l,
            "main at 10.000000 s (CLOCK_MONOTONIC); kvm 0.50 ms, first KVM_RUN 3.00 ms; CPU 3.00 ms (user 1.00, system 2.00)"
        );
        assert_eq!(line(&[], 0.0, 0.0), "no milestones");
    }
}
