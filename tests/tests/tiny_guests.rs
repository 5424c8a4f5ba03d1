//! Tiny machine-code guests on real KVM, in this process: every exit kind ferry handles,
//! serial output, two vCPUs, and pausing/resuming a running guest.

use std::time::Duration;

use ferry_tests::tiny::*;
use kvm_bindings::KVM_MP_STATE_HALTED;
use vmm::{RunState, VmEvent};

/// Hang guard for a tiny guest (they finish in milliseconds on any host).
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn serial_bytes_reach_the_console_and_i8042_reset_ends_the_vm() {
    let t = TinyVm::new(&REAL_SERIAL, 1);
    t.vm.start().unwrap();
    assert_eq!(
        t.wait_event(LIMIT),
        VmEvent::Reset {
            source: "i8042 reset (port 0x64, 0xfe)"
        }
    );
    assert_eq!(t.console.bytes(), b"Hello from ferry's real-mode guest\r\n");
    let exits = t.vm.exit_counts(0).unwrap();
    // One OUT per byte to COM1 plus the reset; at least one IN per byte polling the LSR.
    assert_eq!(exits.io_out, 36 + 1, "{exits:?}");
    assert!(exits.io_in >= 36, "{exits:?}");
}

#[test]
fn port_io_in_and_out() {
    let t = TinyVm::new(&REAL_PIO, 1);
    t.ports.lock().unwrap().reply = 0x2a;
    t.vm.start().unwrap();
    assert!(matches!(t.wait_event(LIMIT), VmEvent::Reset { .. }));
    assert_eq!(t.port_writes(), vec![0x42, 0x2b]);
    let reads: Vec<_> = t
        .ports
        .lock()
        .unwrap()
        .accesses
        .iter()
        .filter(|a| !a.write)
        .cloned()
        .collect();
    assert_eq!(
        reads,
        vec![Access {
            offset: 1,
            write: false,
            data: vec![0x2a]
        }]
    );
    let exits = t.vm.exit_counts(0).unwrap();
    assert_eq!((exits.io_out, exits.io_in), (3, 1), "{exits:?}");
}

#[test]
fn mmio_read_and_write_in_long_mode() {
    let t = TinyVm::new(&LONG_MMIO, 1);
    t.mmio.lock().unwrap().reply = 0x0102_0304_0506_0708;
    t.vm.start().unwrap();
    assert!(matches!(t.wait_event(LIMIT), VmEvent::Reset { .. }));
    let a = t.mmio_accesses();
    assert_eq!(a.len(), 3, "{a:?}");
    assert_eq!(
        a[0],
        Access {
            offset: 0,
            write: true,
            data: 0x1122_3344_5566_7788u64.to_le_bytes().to_vec()
        }
    );
    assert_eq!(
        a[1],
        Access {
            offset: 8,
            write: false,
            data: 0x0102_0304_0506_0708u64.to_le_bytes().to_vec()
        }
    );
    assert_eq!(
        a[2],
        Access {
            offset: 16,
            write: true,
            data: 0x0102_0304_0506_0709u64.to_le_bytes().to_vec()
        }
    );
    let exits = t.vm.exit_counts(0).unwrap();
    assert_eq!((exits.mmio_write, exits.mmio_read), (2, 1), "{exits:?}");
}

#[test]
fn hlt_sleeps_in_kvm_and_a_kick_still_pauses_the_vcpu() {
    let t = TinyVm::new(&REAL_HLT, 1);
    t.vm.start().unwrap();
    wait_for("the guest to announce HLT", LIMIT, || {
        t.port_writes() == [b'H']
    });
    // The vCPU is now asleep inside KVM_RUN; pausing must still get it out.
    t.vm.pause().expect("pause a halted vCPU");
    assert_eq!(t.vm.state(), RunState::Paused);
    let r = t.vm.vcpu_regs(0).unwrap();
    assert_eq!(r.mp_state.mp_state, KVM_MP_STATE_HALTED);
    // RIP is just past the one-byte HLT: 0x1000 + cli(1) + mov(2) + out(2) + hlt(1).
    assert_eq!(r.regs.rip, 0x1006);
    assert_eq!(
        t.vm.exit_counts(0).unwrap().hlt,
        0,
        "with an in-kernel irqchip HLT never exits"
    );
    t.vm.resume().unwrap();
    assert_eq!(
        t.port_writes(),
        [b'H'],
        "the guest must not wake with interrupts off"
    );
}

#[test]
fn triple_fault_is_a_guest_failure_naming_vcpu_and_rip() {
    let t = TinyVm::new(&LONG_TRIPLE_FAULT, 1);
    t.vm.start().unwrap();
    match t.wait_event(LIMIT) {
        VmEvent::GuestFailure { vcpu, reason, rip } => {
            assert_eq!(vcpu, 0);
            assert!(reason.contains("triple fault"), "{reason}");
            // The faulting ud2 follows the 7-byte lidt at the load address.
            assert_eq!(rip, LONG_TRIPLE_FAULT.addr + 7, "rip {rip:#x}");
        }
        other => panic!("expected a guest failure, got {other:?}"),
    }
}

#[test]
fn executing_from_mmio_is_a_kvm_internal_error() {
    let t = TinyVm::new(&LONG_EXEC_MMIO, 1);
    t.vm.start().unwrap();
    match t.wait_event(LIMIT) {
        VmEvent::GuestFailure { vcpu, reason, rip } => {
            assert_eq!(vcpu, 0);
            assert!(
                reason.contains("internal error") && reason.contains("emulation failure"),
                "{reason}"
            );
            assert_eq!(rip, TEST_MMIO + 0x800, "rip {rip:#x}");
        }
        other => panic!("expected a guest failure, got {other:?}"),
    }
}

#[test]
fn two_vcpus_run_with_their_own_apic_ids() {
    let t = TinyVm::new(&REAL_SMP, 2);
    t.vm.start().unwrap();
    wait_for("both vCPUs to report", LIMIT, || t.port_writes().len() == 4);
    let mut w = t.port_writes();
    w.sort();
    assert_eq!(w, vec![0, 1, 0x80, 0x81], "indexes 0, 1 and APIC IDs 0, 1");
    for id in 0..2 {
        assert_eq!(t.vm.exit_counts(id).unwrap().io_out, 2, "vcpu{id}");
    }
}

/// The last pass number the ring-3 guest reported.
fn last_pass(t: &TinyVm) -> u64 {
    t.mmio_accesses()
        .last()
        .map(|a| u64::from_le_bytes(a.data[..8].try_into().unwrap()))
        .unwrap_or(0)
}

#[test]
fn pause_and_resume_a_guest_running_in_ring_3() {
    let t = TinyVm::new(&LONG_RING3, 1);
    t.vm.start().unwrap();
    wait_for("the ring-3 guest to report passes", LIMIT, || {
        last_pass(&t) >= 3
    });
    for round in 0..5 {
        t.vm.pause().expect("pause");
        assert_eq!(t.vm.state(), RunState::Paused);
        let at_pause = last_pass(&t);
        let regs = t.vm.vcpu_regs(0).unwrap();
        assert_eq!(
            regs.sregs.cs.dpl, 3,
            "round {round}: the guest runs in ring 3"
        );
        // While paused the vCPU runs nothing: the reported count stays put.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            last_pass(&t),
            at_pause,
            "round {round}: progress while paused"
        );
        t.vm.resume().unwrap();
        wait_for("progress after resume", LIMIT, || last_pass(&t) > at_pause);
    }
    // Every page of the last complete pass holds that pass number (or the next one, if the
    // guest was mid-pass when paused).
    t.vm.pause().unwrap();
    let done = last_pass(&t);
    for page in 0..256u64 {
        let v: u64 = vm_memory_read(&t, 0x20_0000 + page * 4096);
        assert!(
            v == done || v == done + 1,
            "page {page}: {v} after pass {done}"
        );
    }
}

fn vm_memory_read(t: &TinyVm, addr: u64) -> u64 {
    use vm_memory::Bytes;
    t.vm.memory()
        .read_obj(vm_memory::GuestAddress(addr))
        .unwrap()
}
