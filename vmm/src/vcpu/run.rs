//! A vCPU thread: it starts paused, runs the commands it is sent, and while running enters
//! the guest (KVM_RUN) and handles each exit with one match, the I/O on the VM's buses.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, OnceLock};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::register_signal_handler;

use super::{kick_signal, RunState, VcpuCmd, VcpuRegs, VcpuShared};
use crate::devices::IoBuses;
use crate::event::VmEvent;

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
                let _ = req.reply.send(crate::vcpu::state::save_state(
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
                Err(system_event(kind))
            }
            Ok(VcpuExit::Shutdown) => Err(Err("triple fault (KVM_EXIT_SHUTDOWN)".to_string())),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(Err(format!(
                "VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, host cpu {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => Err(Err(self.internal_error())),
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

    /// What KVM says of an internal error exit (KVM_EXIT_INTERNAL_ERROR).
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills `internal`.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            _ => "unknown",
        };
        format!(
            "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {}: {what})",
            internal.suberror
        )
    }
}

/// The VM event a KVM system event means, or why the guest failed.
fn system_event(kind: u32) -> Result<VmEvent, String> {
    match kind {
        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Ok(VmEvent::Poweroff),
        kvm_bindings::KVM_SYSTEM_EVENT_RESET => Ok(VmEvent::Reset {
            source: "KVM system event reset",
        }),
        other => Err(format!("KVM system event {other}")),
    }
}
