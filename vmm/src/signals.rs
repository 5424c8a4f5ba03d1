//! SIGTERM and SIGINT for a ferry that runs (or waits for) a VM: the signals are blocked in
//! every thread and taken by one thread of their own ("signals", sigwait), which stops the
//! VM in order: a migration under way is cancelled first and the guest stays here (a
//! postcopy or a migration past Commit cannot be: it is waited for), then the VM gets its
//! stop request, as `vm.shutdown` would give it. A ferry with no VM yet (waiting for one)
//! exits at once.
//!
//! ```text
//! start() (before any other thread) -> thread "signals": sigwait -> watched VM?
//!   yes: cancel + wait for the migration -> Vm::request_stop("SIGTERM")
//!   no:  exit(128 + signal)
//! ```

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::api::handlers::Served;

static WATCHED: OnceLock<Arc<Served>> = OnceLock::new();

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread started from it) and
/// starts the thread that takes them. Call it before any other thread starts, once the
/// sandbox's filters are built (crate::sandbox::set_mode).
pub fn start() -> std::io::Result<()> {
    let set = signal_set();
    // SAFETY: the set is initialized (signal_set); the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::sandbox::enter_or_exit(crate::sandbox::Kind::Signals);
            loop {
                let mut sig = 0;
                // SAFETY: waits for one of the blocked signals of an initialized set.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    take(sig);
                }
            }
        })?;
    Ok(())
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the zeroed set; sigaddset adds valid signals to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// From now on a signal stops `served`'s VM (and its migration) instead of ending ferry at
/// once.
pub fn watch(served: Arc<Served>) {
    let _ = WATCHED.set(served);
}

fn take(sig: i32) {
    let name = if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    let Some(vm) = WATCHED.get().and_then(|s| Some((s, s.vm()?.clone()))) else {
        eprintln!("ferry: {name} with no VM running here: exiting");
        crate::monitor::emit("vmm", "shutdown", None);
        std::process::exit(128 + sig);
    };
    let (served, vm) = vm;
    if served.control.cancel() {
        eprintln!("ferry: {name}: cancelling the migration under way (the guest stays here), then stopping the VM");
        while served.control.is_active() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    vm.request_stop(name);
}
