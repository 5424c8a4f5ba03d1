//! Save a running tiny guest and restore it into a new VM: it continues where it was.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_tests::tiny::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::manager::BusKind;
use vmm::Vm;

const LIMIT: Duration = Duration::from_secs(60);

fn last_pass(accesses: &[Access]) -> u64 {
    accesses
        .last()
        .map(|a| u64::from_le_bytes(a.data[..8].try_into().unwrap()))
        .unwrap_or(0)
}

#[test]
fn a_counting_guest_continues_in_a_new_vm_with_equal_registers_and_memory() {
    let t = TinyVm::new(&LONG_RING3, 1);
    t.vm.start().unwrap();
    wait_for("a few passes", LIMIT, || last_pass(&t.mmio_accesses()) >= 5);
    t.vm.pause().unwrap();
    let at_save = last_pass(&t.mmio_accesses());
    let saved = t.vm.save_state().expect("save the paused VM");
    assert_eq!(saved.vcpus.len(), 1);
    assert_eq!(saved.vcpus[0].sregs.segments[0].dpl, 3, "saved in ring 3");
    assert!(!saved.memory.is_empty());

    // A new VM from the saved state, with its own test device.
    let vm2 = Vm::restore(
        &saved,
        &mut Default::default(),
        Box::new(Console::default()),
    )
    .expect("restore");
    let mmio2 = Arc::new(Mutex::new(Recorder::default()));
    vm2.devices()
        .add(
            BusKind::Mmio,
            TEST_MMIO,
            0x1000,
            mmio2.clone(),
            "test MMIO page",
        )
        .unwrap();

    // Before it runs, it is the same machine: registers and memory equal, and a second save
    // equals the first apart from clocks.
    let again = vm2.save_state().expect("save the restored VM");
    assert_eq!(
        ferry_tests::without_clocks(again),
        ferry_tests::without_clocks(saved.clone())
    );
    for r in &saved.memory {
        let mut buf = vec![0u8; r.data.len()];
        vm2.memory()
            .read_slice(&mut buf, GuestAddress(r.gpa))
            .unwrap();
        assert!(buf == r.data, "memory at {:#x} differs", r.gpa);
    }

    // It continues with the next value, not from the start.
    vm2.start().unwrap();
    wait_for("the restored guest to report", LIMIT, || {
        !mmio2.lock().unwrap().accesses.is_empty()
    });
    vm2.pause().unwrap();
    let first = u64::from_le_bytes(
        mmio2.lock().unwrap().accesses[0].data[..8]
            .try_into()
            .unwrap(),
    );
    assert_eq!(first, at_save + 1, "the restored guest's first report");
    // The original is untouched and can go on too.
    t.vm.resume().unwrap();
    wait_for("the original to go on", LIMIT, || {
        last_pass(&t.mmio_accesses()) > at_save
    });
}
