//! vCPU threads: one per vCPU, each an explicit state machine.
//!
//! ```text
//!            Resume                       Stop / guest failure / VM event
//!  Paused ----------> Running --------------------------------------------> Stopped
//!    ^  <----------------'
//!        Pause (kick: signal + immediate_exit, then ack)
//! ```
//! The controlling thread sends a [`VcpuCmd`] on the vCPU's channel and kicks the thread with
//! [`KICK_SIGNAL`]. The signal handler sets `immediate_exit` in this thread's `kvm_run`, so a
//! KVM_RUN in progress returns at once and one about to start returns without entering the
//! guest: a command is seen within one exit, never lost. The thread publishes its state
//! in [`VcpuShared`]; `Paused` is published only once the thread is out of KVM_RUN.
//! Register reads for a paused vCPU run on its own thread ([`VcpuCmd::GetRegs`]).
//!
//! ```text
//! mod.rs     the thread's commands, shared state and the controller's handle
//! run.rs     the thread: its loop over commands and KVM_RUN, one match on the exit
//! setup.rs   a booted vCPU before its first run: FPU, LAPIC LINT pins, boot registers
//! state.rs   one vCPU's state between KVM and the migration crate's vendor-neutral form
//! xsave.rs   XSAVE state re-laid out at each host's offsets
//! msrs.rs    which MSRs travel, from the features of the guest's CPU profile
//! ```

pub mod msrs;
mod run;
pub mod setup;
pub mod state;
pub mod xsave;

pub use run::{install_kick_handler, Vcpu};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_sregs};
use vmm_sys_util::signal::SIGRTMIN;

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}
/// Alias kept for docs.
pub use kick_signal as KICK_SIGNAL;

/// What a vCPU thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Paused,
    Running,
    Stopped,
}

/// Commands to a vCPU thread.
#[derive(Debug)]
pub enum VcpuCmd {
    Pause,
    Resume,
    Stop,
    /// Reply with the registers and MP state (the vCPU must be paused).
    GetRegs(Sender<Result<VcpuRegs, kvm_ioctls::Error>>),
    /// Save the whole vCPU state on its own thread (the vCPU must be paused).
    Save(SaveRequest),
    /// Stay out of the guest for this long (migration throttling); any other command ends
    /// the wait at once.
    Throttle(Duration),
}

/// What a vCPU needs to save its state, and where to send it.
#[derive(Debug)]
pub struct SaveRequest {
    pub host: std::sync::Arc<cpuid::CpuidDump>,
    pub msrs: std::sync::Arc<Vec<u32>>,
    pub reply: Sender<Result<migration::VcpuState, crate::vcpu::state::Error>>,
}

/// A paused vCPU's registers, for tests and diagnostics.
#[derive(Debug, Clone)]
pub struct VcpuRegs {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub mp_state: kvm_mp_state,
}

/// Counts of each kind of exit, per vCPU.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub hlt: AtomicU64,
    pub interrupted: AtomicU64,
    pub system_event: AtomicU64,
}

/// A snapshot of [`ExitCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExitCounts {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub hlt: u64,
    pub interrupted: u64,
    pub system_event: u64,
}

impl ExitCounters {
    pub fn snapshot(&self) -> ExitCounts {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCounts {
            io_in: l(&self.io_in),
            io_out: l(&self.io_out),
            mmio_read: l(&self.mmio_read),
            mmio_write: l(&self.mmio_write),
            hlt: l(&self.hlt),
            interrupted: l(&self.interrupted),
            system_event: l(&self.system_event),
        }
    }
}

/// State shared between a vCPU thread and its controller.
#[derive(Debug)]
pub struct VcpuShared {
    state: Mutex<RunState>,
    changed: Condvar,
    pub exits: ExitCounters,
}

impl VcpuShared {
    pub fn new() -> Self {
        VcpuShared {
            state: Mutex::new(RunState::Paused),
            changed: Condvar::new(),
            exits: ExitCounters::default(),
        }
    }

    pub fn state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, s: RunState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
        self.changed.notify_all();
    }

    /// Waits until the state satisfies `done`, or the deadline passes. Returns the state.
    pub fn wait_until(&self, deadline: Instant, done: impl Fn(RunState) -> bool) -> RunState {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !done(*s) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *s
    }
}

impl Default for VcpuShared {
    fn default() -> Self {
        Self::new()
    }
}

/// The controller's side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    pub id: u32,
    cmds: Sender<VcpuCmd>,
    pub shared: Arc<VcpuShared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A vCPU's thread asked for ([`VcpuHandle::start`]); [`StartingVcpu::handle`] waits
/// for it. Several asked for at once start together.
#[derive(Debug)]
pub struct StartingVcpu {
    id: u32,
    cmds: Sender<VcpuCmd>,
    shared: Arc<VcpuShared>,
    thread: crate::sandbox::Spawning<()>,
}

impl StartingVcpu {
    /// The handle, once the thread has started.
    pub fn handle(self) -> std::io::Result<VcpuHandle> {
        Ok(VcpuHandle {
            id: self.id,
            cmds: self.cmds,
            shared: self.shared,
            thread: Mutex::new(Some(self.thread.handle()?)),
        })
    }
}

impl VcpuHandle {
    /// Asks for the thread of `vcpu` (paused) without waiting for it to start.
    pub fn start(vcpu: Vcpu, cmds: Sender<VcpuCmd>) -> StartingVcpu {
        let id = vcpu.id;
        let shared = vcpu.shared.clone();
        let thread = crate::sandbox::spawn_soon(format!("vcpu{id}"), move || vcpu.run_loop());
        StartingVcpu {
            id,
            cmds,
            shared,
            thread,
        }
    }

    /// Sends a command and kicks the thread out of KVM_RUN.
    pub fn send(&self, cmd: VcpuCmd) {
        if self.cmds.send(cmd).is_ok() {
            self.kick();
        }
    }

    fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = thread.as_ref() {
            if t.is_finished() {
                return;
            }
            // SAFETY: the pthread is alive (joined only in `join`, which takes the handle),
            // and the kick signal has a handler that only touches this thread's kvm_run.
            let rc = unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            if rc != 0 && rc != libc::ESRCH {
                log::warn!(
                    "vcpu{}: kick failed: {}",
                    self.id,
                    std::io::Error::from_raw_os_error(rc)
                );
            }
        }
    }

    pub fn state(&self) -> RunState {
        self.shared.state()
    }

    /// Reads registers of a paused vCPU on its own thread.
    pub fn regs(&self, timeout: Duration) -> Option<Result<VcpuRegs, kvm_ioctls::Error>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(VcpuCmd::GetRegs(tx));
        rx.recv_timeout(timeout).ok()
    }

    /// Stops the thread and waits for it to end.
    pub fn join(&self) {
        self.send(VcpuCmd::Stop);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.join();
    }
}
