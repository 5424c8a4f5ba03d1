//! Pausing (and so saving) a vCPU right after a port-I/O exit must not leave the instruction
//! half done: KVM puts an IN's value into AL only on the next KVM_RUN, so ferry enters once
//! more (immediate_exit) before it reports the vCPU paused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_tests::tiny::*;
use vmm::devices::manager::BusKind;
use vmm::devices::BusDevice;

/// Port 0xf5 hands out 1, 2, 3, ... (slowly, so that pauses land during the exit);
/// writes to 0xf4 are counted.
#[derive(Default)]
struct SlowCounter {
    handed_out: u64,
    echoed: u64,
}

impl BusDevice for SlowCounter {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        std::thread::sleep(Duration::from_micros(300));
        self.handed_out += 1;
        data[0] = self.handed_out as u8;
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.echoed += 1;
    }
}

#[test]
fn a_paused_vcpu_has_finished_its_last_in() {
    ferry_tests::require_kvm();
    let console = Console::default();
    let dev = Arc::new(Mutex::new(SlowCounter::default()));
    let vm = vmm::vm::VmBuilder::new(64 << 20, 1)
        .console(Box::new(console))
        .device(BusKind::Pio, TEST_PORT_OUT, 2, dev.clone(), "slow counter")
        .build(vmm::vm::Boot::Raw {
            image: REAL_IO_LOOP.bytes,
            addr: REAL_IO_LOOP.addr,
            entry: vmm::boot::EntryPoint::Real {
                rip: REAL_IO_LOOP.addr,
            },
        })
        .unwrap();
    vm.start().unwrap();
    for round in 0..20 {
        std::thread::sleep(Duration::from_millis(2));
        vm.pause().unwrap();
        let handed_out = dev.lock().unwrap().handed_out;
        let state = vm.save_state().unwrap();
        let al = state.vcpus[0].regs.gpr[0] as u8;
        assert_eq!(
            al, handed_out as u8,
            "round {round}: AL lags the value the device handed out (rip {:#x})",
            state.vcpus[0].regs.rip
        );
        vm.resume().unwrap();
    }
    assert!(dev.lock().unwrap().echoed > 20);
}
