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

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::IoBuses;
use crate::event::VmEvent;

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
    pub reply: Sender<Result<migration::VcpuState, crate::vcpu_state::Error>>,
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

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: `run` is this thread's own kvm_run mapping, published by `Vcpu::run_loop`
        // before any kick can be sent and cleared before the mapping goes away. Writing one
        // byte to it is async-signal-safe.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    // The outcome is kept: a failure is reported to every caller, not only the first
    // (without the handler a kick would kill the process).
    static RESULT: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    *RESULT.get_or_init(|| register_signal_handler(kick_signal(), handle_kick))
}

/// A vCPU as owned by its thread.
pub struct Vcpu {
    pub id: u32,
    pub fd: VcpuFd,
    pub io: Arc<IoBuses>,
    pub events: Sender<VmEvent>,
    pub cmds: Receiver<VcpuCmd>,
    pub shared: Arc<VcpuShared>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vcpu({})", self.id)
    }
}

/// Runs when a vCPU thread ends, normally or by a panic: the kick handler must never see a
/// stale kvm_run pointer, and a panicked vCPU is a stopped one the VM must hear about.
struct ThreadGuard {
    id: u32,
    shared: Arc<VcpuShared>,
    events: Sender<VmEvent>,
}

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        if std::thread::panicking() {
            self.shared.set(RunState::Stopped);
            let _ = self.events.send(VmEvent::GuestFailure {
                vcpu: self.id,
                reason: "the vCPU thread panicked".into(),
                rip: u64::MAX,
            });
        }
    }
}

/// What handling one exit means for the loop.
enum Next {
    Continue,
    Stop,
}

impl Vcpu {
    /// The thread body: starts paused and runs commands until stopped.
    pub fn run_loop(mut self) {
        let _guard = ThreadGuard {
            id: self.id,
            shared: self.shared.clone(),
            events: self.events.clone(),
        };
        KVM_RUN.with(|r| r.set(self.fd.get_kvm_run() as *mut kvm_run));
        crate::sandbox::enter_or_exit(crate::sandbox::Kind::Vcpu);
        let mut state = RunState::Paused;
        self.shared.set(state);
        while state != RunState::Stopped {
            if state == RunState::Paused {
                match self.cmds.recv() {
                    Ok(cmd) => state = self.command(cmd, state),
                    Err(_) => state = RunState::Stopped,
                }
                continue;
            }
            // Running: take every pending command first, then enter the guest.
            while let Ok(cmd) = self.cmds.try_recv() {
                state = self.command(cmd, state);
            }
            if state != RunState::Running {
                continue;
            }
            crate::timeline::first_run();
            if let Next::Stop = self.run_once() {
                state = RunState::Stopped;
                self.shared.set(state);
            }
        }
    }

    fn command(&mut self, cmd: VcpuCmd, state: RunState) -> RunState {
        let next = match cmd {
            VcpuCmd::Pause => {
                if state == RunState::Running {
                    self.complete_pending_io();
                }
                RunState::Paused
            }
            VcpuCmd::Resume => RunState::Running,
            VcpuCmd::Stop => RunState::Stopped,
            VcpuCmd::GetRegs(reply) => {
                let _ = reply.send(self.regs());
                state
            }
            VcpuCmd::Save(req) => {
                let _ = req.reply.send(crate::vcpu_state::save_state(
                    &self.fd, self.id, &req.host, &req.msrs,
                ));
                state
            }
            VcpuCmd::Throttle(d) => {
                if state == RunState::Running {
                    if let Ok(cmd) = self.cmds.recv_timeout(d) {
                        return self.command(cmd, state);
                    }
                }
                state
            }
        };
        // Publish even when unchanged, so that a waiter for Paused sees the ack.
        self.shared.set(next);
        next
    }

    /// KVM finishes a port I/O or MMIO instruction (the IN's result in RAX, RIP past it)
    /// only on the next KVM_RUN. Before the vCPU is reported paused, and so before its state
    /// can be read or saved, enter once with immediate_exit set: KVM completes the pending
    /// instruction and returns EINTR without running guest code.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => log::warn!("vcpu{}: completing pending I/O: {e}", self.id),
            Ok(exit) => log::warn!(
                "vcpu{}: unexpected exit while completing pending I/O: {exit:?}",
                self.id
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    fn regs(&self) -> Result<VcpuRegs, kvm_ioctls::Error> {
        Ok(VcpuRegs {
            regs: self.fd.get_regs()?,
            sregs: self.fd.get_sregs()?,
            mp_state: self.fd.get_mp_state()?,
        })
    }

    fn fail(&self, reason: String) -> Next {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
        let _ = self.events.send(VmEvent::GuestFailure {
            vcpu: self.id,
            reason,
            rip,
        });
        Next::Stop
    }

    fn run_once(&mut self) -> Next {
        let exits = &self.shared.exits;
        let io = &self.io;
        let result = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                exits.io_in.fetch_add(1, Ordering::Relaxed);
                io.pio.read(u64::from(port), data);
                Ok(Next::Continue)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                exits.io_out.fetch_add(1, Ordering::Relaxed);
                io.pio.write(u64::from(port), data);
                Ok(Next::Continue)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                exits.mmio_read.fetch_add(1, Ordering::Relaxed);
                io.mmio.read(addr, data);
                Ok(Next::Continue)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                exits.mmio_write.fetch_add(1, Ordering::Relaxed);
                io.mmio.write(addr, data);
                Ok(Next::Continue)
            }
            Ok(VcpuExit::Hlt) => {
                // Only without an in-kernel irqchip; ferry always has one.
                exits.hlt.fetch_add(1, Ordering::Relaxed);
                Ok(Next::Continue)
            }
            Ok(VcpuExit::Intr) => {
                exits.interrupted.fetch_add(1, Ordering::Relaxed);
                Ok(Next::Continue)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                exits.system_event.fetch_add(1, Ordering::Relaxed);
                Err(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Ok(VmEvent::Poweroff),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Ok(VmEvent::Reset {
                        source: "KVM system event reset",
                    }),
                    other => Err(format!("KVM system event {other}")),
                })
            }
            Ok(VcpuExit::Shutdown) => Err(Err("triple fault (KVM_EXIT_SHUTDOWN)".to_string())),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(Err(format!(
                "VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, host cpu {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills `internal`.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let what = match internal.suberror {
                    kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
                    kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => {
                        "exception while delivering an exception"
                    }
                    kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
                    _ => "unknown",
                };
                Err(Err(format!(
                    "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {}: {what})",
                    internal.suberror
                )))
            }
            Ok(other) => Err(Err(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                exits.interrupted.fetch_add(1, Ordering::Relaxed);
                Ok(Next::Continue)
            }
            Err(e) => Err(Err(format!("KVM_RUN failed: {e}"))),
        };
        match result {
            Ok(next) => next,
            Err(Ok(event)) => {
                let _ = self.events.send(event);
                Next::Stop
            }
            Err(Err(reason)) => self.fail(reason),
        }
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
