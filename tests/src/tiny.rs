//! The tiny guests (tests/tiny/*.S, assembled by build.rs) and in-process VMs to run them,
//! with a recording test device on the test ports and the MMIO test page.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::boot::layout::BOOT_STACK_TOP;
use vmm::boot::EntryPoint;
use vmm::devices::manager::BusKind;
use vmm::devices::BusDevice;
use vmm::vm::{Boot, CpuChoice};
use vmm::Vm;

/// How a tiny image is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyMode {
    Real,
    Long64,
}

/// An assembled tiny guest.
#[derive(Debug, Clone, Copy)]
pub struct TinyImage {
    pub name: &'static str,
    pub bytes: &'static [u8],
    pub addr: u64,
    pub mode: TinyMode,
}

/// A tiny guest linked as a PVH ELF (tests/tiny/pvh_*.S): booted like a kernel, by ferry or
/// any VMM that boots PVH.
#[derive(Debug, Clone, Copy)]
pub struct PvhImage {
    pub name: &'static str,
    pub elf: &'static [u8],
}

impl PvhImage {
    /// Writes the ELF to a file under the temporary directory and returns its path.
    pub fn write_to_temp(&self) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("ferry-{}-{}.elf", self.name, std::process::id()));
        std::fs::write(&path, self.elf).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

include!(concat!(env!("OUT_DIR"), "/tiny.rs"));

/// The test ports and MMIO page (tests/tiny/README.md).
pub const TEST_PORT_OUT: u64 = 0xf4;
pub const TEST_PORT_IN: u64 = 0xf5;
pub const TEST_MMIO: u64 = 0xd000_0000;

/// One access seen by the [`Recorder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub offset: u64,
    pub write: bool,
    pub data: Vec<u8>,
}

/// A device that records every access and answers reads with the next value of `script`,
/// or `reply` once the script is used up (little-endian).
#[derive(Debug, Default)]
pub struct Recorder {
    pub accesses: Vec<Access>,
    pub reply: u64,
    pub script: std::collections::VecDeque<u64>,
}

impl BusDevice for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.script.pop_front().unwrap_or(self.reply).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
        self.accesses.push(Access {
            offset,
            write: false,
            data: data.to_vec(),
        });
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.accesses.push(Access {
            offset,
            write: true,
            data: data.to_vec(),
        });
    }
}

/// A console that keeps what the guest wrote.
#[derive(Debug, Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// A tiny guest in a VM of this process, with its test devices.
#[derive(Debug)]
pub struct TinyVm {
    pub vm: Vm,
    pub console: Console,
    pub ports: Arc<Mutex<Recorder>>,
    pub mmio: Arc<Mutex<Recorder>>,
}

impl TinyVm {
    /// Creates a 64 MiB VM with `vcpus` vCPUs running `image` (paused until `start`).
    pub fn new(image: &TinyImage, vcpus: u32) -> TinyVm {
        Self::with_cpu(image, vcpus, None)
    }

    /// As `new`, with a CPU profile instead of the default one.
    pub fn with_cpu(
        image: &TinyImage,
        vcpus: u32,
        cpu: Option<cpuid::profile::CpuProfile>,
    ) -> TinyVm {
        let cpu = cpu.map_or(CpuChoice::Default, CpuChoice::Profile);
        Self::with(image, vcpus, |b| b.cpu(cpu))
    }

    /// As `new`, with more of the machine (`more` adds to the builder: a CPU profile, virtio
    /// devices).
    pub fn with(
        image: &TinyImage,
        vcpus: u32,
        more: impl FnOnce(vmm::vm::VmBuilder) -> vmm::vm::VmBuilder,
    ) -> TinyVm {
        crate::require_kvm();
        let console = Console::default();
        let ports = Arc::new(Mutex::new(Recorder::default()));
        let mmio = Arc::new(Mutex::new(Recorder::default()));
        let entry = match image.mode {
            TinyMode::Real => EntryPoint::Real { rip: image.addr },
            TinyMode::Long64 => EntryPoint::Long64 {
                rip: image.addr,
                rsp: BOOT_STACK_TOP,
            },
        };
        let builder = vmm::vm::VmBuilder::new(64 << 20, vcpus).console(Box::new(console.clone()));
        let vm = more(builder)
            .device(BusKind::Pio, TEST_PORT_OUT, 2, ports.clone(), "test ports")
            .device(
                BusKind::Mmio,
                TEST_MMIO,
                0x1000,
                mmio.clone(),
                "test MMIO page",
            )
            .build(Boot::Raw {
                image: image.bytes,
                addr: image.addr,
                entry,
            })
            .expect("a VM with the tiny guest");
        TinyVm {
            vm,
            console,
            ports,
            mmio,
        }
    }

    /// The bytes written to the test port, in order.
    pub fn port_writes(&self) -> Vec<u8> {
        let r = self.ports.lock().unwrap();
        r.accesses
            .iter()
            .filter(|a| a.write && a.offset == 0)
            .map(|a| a.data[0])
            .collect()
    }

    /// The MMIO accesses so far.
    pub fn mmio_accesses(&self) -> Vec<Access> {
        self.mmio.lock().unwrap().accesses.clone()
    }

    /// Waits for a VM event (a hang guard, not a timing assertion).
    pub fn wait_event(&self, limit: Duration) -> vmm::VmEvent {
        self.vm
            .next_event(limit)
            .unwrap_or_else(|| panic!("no VM event within {limit:?}"))
    }
}

/// Polls `cond` every millisecond until it holds; panics naming `what` after `limit` (a hang
/// guard for tests, generous on purpose).
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
