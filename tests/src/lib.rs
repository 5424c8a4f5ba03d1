//! Support for ferry's integration tests (tests/tests/*.rs) and benchmarks: KVM checks,
//! tiny machine-code guests, the Linux test guest, and driving `ferry` processes.
//!
//! Every test that needs /dev/kvm calls [`require_kvm`] first, which fails the test with a
//! clear message when KVM is missing: these tests never pass silently without it.

pub mod binary;
pub mod corpus;
pub mod guest;
pub mod netns;
pub mod process;
pub mod recording;
pub mod relay;
pub mod service;
pub mod storm;
pub mod streams;
pub mod tiny;
pub mod tls_relay;

use std::path::Path;

/// Turns ferry's seccomp filters on in this test process, as the `ferry` command does: from
/// now on every ferry thread started here (vCPUs, the virtio loop, the control socket, a
/// destination's builder) enters its kind's filter, and a call outside it ends the whole
/// test process with ferry's one-line report (status 159). With `kind`, the calling
/// thread enters that kind's filter too (the thread a test runs a destination on).
pub fn sandbox_on(kind: Option<vmm::sandbox::Kind>) {
    vmm::sandbox::set_mode(vmm::sandbox::Mode::On, None)
        .expect("compiling ferry's seccomp filters");
    // Threads a narrowly filtered thread needs (a destination's VM) start from here, and
    // /dev/kvm is open already, as `ferry receive` and `ferry restore` have them.
    vmm::sandbox::start_spawner().expect("starting the spawner thread");
    vmm::vm::keep_kvm_open().expect("opening /dev/kvm");
    if let Some(kind) = kind {
        vmm::sandbox::enter(kind).expect("entering a seccomp filter");
    }
}

/// This host's default guest CPU profile as JSON, as a source's Hello carries it (a test
/// playing a source).
pub fn host_profile_json() -> String {
    let kvm = vmm::vm::open_kvm().expect("/dev/kvm");
    let host = vmm::guest_cpu::model::host_dump(&kvm).expect("this host's CPUID");
    vmm::guest_cpu::model::default_profile(&host)
        .expect("this host's default profile")
        .to_json()
}

/// Fails the calling test unless /dev/kvm can be opened for reading and writing.
pub fn require_kvm() {
    use std::os::unix::fs::FileTypeExt;
    let dev = Path::new("/dev/kvm");
    let is_device = std::fs::metadata(dev).map(|m| m.file_type().is_char_device());
    assert!(
        matches!(is_device, Ok(true)),
        "this test needs /dev/kvm, the KVM character device ({is_device:?}); run it on a Linux \
         host with KVM enabled"
    );
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        panic!(
            "this test needs a usable /dev/kvm ({e}); run it on a Linux host with KVM enabled \
             and access to /dev/kvm (root or the kvm group)"
        );
    }
}

/// A saved VM without what legitimately changes between two saves of the same paused guest:
/// the kvmclock, the PIT's load times, and IA32_TSC, which run on.
pub fn without_clocks(mut s: migration::VmState) -> migration::VmState {
    s.irqchip.clock_ns = 0;
    s.irqchip.clock_flags = 0;
    s.irqchip.pit.clear();
    for v in &mut s.vcpus {
        v.msrs.retain(|(i, _)| *i != 0x10);
    }
    s
}
