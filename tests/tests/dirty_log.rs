//! Guest RAM is KVM memslots whose dirty logging is switched on and off on a live VM: the
//! pages a guest writes are exactly the pages KVM reports, and pages ferry writes itself are
//! caught by the VMM-side bitmap.

use std::time::Duration;

use ferry_tests::tiny::*;
use vm_memory::{Bytes, GuestAddress};

const BUF: u64 = 0x40_0000;
const N: u64 = 37;

fn pages_in(bitmaps: &vmm::memory::PageSet, first: u64, count: u64) -> Vec<u64> {
    // 64 MiB of RAM is one slot starting at 0: bit i of the bitmap is page i.
    let bits = &bitmaps[0];
    (first..first + count)
        .filter(|p| bits[(*p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect()
}

#[test]
fn guest_and_vmm_writes_are_reported_exactly() {
    let t = TinyVm::new(&LONG_DIRTY, 1);
    t.mmio.lock().unwrap().reply = N;
    {
        let ram = t.vm.ram();
        assert!(!ram.dirty_logging());
        ram.set_dirty_logging(true)
            .expect("switch dirty logging on");
        ram.take_dirty_log().expect("clear the log");
        ram.take_vmm_dirty();
    }
    t.vm.start().unwrap();
    wait_for(
        "the guest to finish its stores",
        Duration::from_secs(60),
        || t.mmio_accesses().iter().any(|a| a.write),
    );
    t.vm.pause().unwrap();
    let ram = t.vm.ram();
    let log = ram.take_dirty_log().unwrap();
    let first = BUF / 4096;
    let dirty = pages_in(&log, first, 1024);
    assert_eq!(dirty, (first..first + N).collect::<Vec<_>>());
    // Harvesting cleared the log.
    assert!(pages_in(&ram.take_dirty_log().unwrap(), first, 1024).is_empty());

    // A write by the VMM is not in KVM's log but in the VMM bitmap.
    ram.memory()
        .write_obj(0x5au8, GuestAddress(BUF + 2000 * 4096))
        .unwrap();
    assert_eq!(
        pages_in(&ram.take_vmm_dirty(), first, 4096),
        vec![first + 2000]
    );
    assert!(pages_in(&ram.take_dirty_log().unwrap(), first, 4096).is_empty());

    // Switched off, there is no log to read, and the memory is intact.
    ram.set_dirty_logging(false)
        .expect("switch dirty logging off");
    assert!(ram.take_dirty_log().is_err());
    for p in 0..N {
        let b: u8 = ram.memory().read_obj(GuestAddress(BUF + p * 4096)).unwrap();
        assert_eq!(b, 0xa5, "page {p}");
    }
}
