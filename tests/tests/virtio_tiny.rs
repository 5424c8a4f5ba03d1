//! virtio-blk on the virtio-mmio transport, driven by a tiny guest (tests/tiny/
//! long_mmio_script.S) that plays a driver's register traffic while the test lays the queues
//! out in guest RAM: requests are served through the ioeventfd and the event loop, every
//! byte the device writes is in the dirty log, and a hostile driver (a buffer outside RAM, a
//! chain that loops or leaves the table, lengths that overflow, a queue size that is not a
//! power of two) gets DEVICE_NEEDS_RESET while the VMM and the other devices go on.

use std::time::Duration;

use ferry_tests::tiny::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::config::DiskConfig;

const SCRIPT: u64 = 0x20_0000;
const LIMIT: Duration = Duration::from_secs(30);
const NEEDS_RESET: u32 = 0x40;

fn base(dev: u64) -> u64 {
    vmm::devices::virtio::MMIO_BASE + dev * vmm::devices::virtio::MMIO_SIZE
}

/// A device's queue 0 and buffers in guest RAM.
struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
    data: u64,
}

fn layout(dev: u64) -> Layout {
    let desc = 0x30_0000 + dev * 0x1_0000;
    Layout {
        desc,
        avail: desc + 0x1000,
        used: desc + 0x2000,
        data: 0x40_0000 + dev * 0x10_0000,
    }
}

/// The guest's script: (op, value, address) entries (see the .S file).
#[derive(Default)]
struct Script(Vec<(u32, u32, u64)>);

impl Script {
    fn w(&mut self, addr: u64, v: u32) {
        self.0.push((1, v, addr));
    }
    /// Waits for the device's interrupt status, then reads its status: returns the index
    /// of that read's entry.
    fn wait_and_status(&mut self, dev: u64) -> usize {
        self.0.push((3, 3, base(dev) + 0x60));
        self.0.push((2, 0, base(dev) + 0x70));
        self.0.len() - 1
    }
    /// Reset, features (VERSION_1), queue 0 of `size` at the layout, DRIVER_OK.
    fn setup(&mut self, dev: u64, size: u32) {
        let (b, l) = (base(dev), layout(dev));
        self.w(b + 0x70, 0);
        self.w(b + 0x70, 1);
        self.w(b + 0x70, 3);
        self.w(b + 0x24, 1);
        self.w(b + 0x20, 1);
        self.w(b + 0x24, 0);
        self.w(b + 0x20, 0);
        self.w(b + 0x70, 0xb);
        self.w(b + 0x30, 0);
        self.w(b + 0x38, size);
        for (reg, addr) in [(0x80, l.desc), (0x90, l.avail), (0xa0, l.used)] {
            self.w(b + reg, addr as u32);
            self.w(b + reg + 4, (addr >> 32) as u32);
        }
        self.w(b + 0x44, 1);
        self.w(b + 0x70, 0xf);
    }
    fn notify(&mut self, dev: u64) {
        self.w(base(dev) + 0x50, 0);
    }
    fn store(&self, vm: &vmm::Vm) {
        let mut bytes = Vec::new();
        for (op, v, a) in self.0.iter().copied().chain([(0, 0, 0)]) {
            bytes.extend(op.to_le_bytes());
            bytes.extend(v.to_le_bytes());
            bytes.extend(a.to_le_bytes());
        }
        vm.memory()
            .write_slice(&bytes, GuestAddress(SCRIPT))
            .unwrap();
    }
    /// The value field of entry `i` after the guest ran.
    fn value(vm: &vmm::Vm, i: usize) -> u32 {
        vm.memory()
            .read_obj(GuestAddress(SCRIPT + 16 * i as u64 + 4))
            .unwrap()
    }
}

/// Descriptor `i` of device `dev`'s table.
fn desc(vm: &vmm::Vm, dev: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend(len.to_le_bytes());
    d.extend(flags.to_le_bytes());
    d.extend(next.to_le_bytes());
    let at = layout(dev).desc + 16 * i;
    vm.memory().write_slice(&d, GuestAddress(at)).unwrap();
}

/// Makes chains with these heads available.
fn avail(vm: &vmm::Vm, dev: u64, heads: &[u16]) {
    let l = layout(dev);
    let m = vm.memory();
    for (i, h) in heads.iter().enumerate() {
        m.write_obj(*h, GuestAddress(l.avail + 4 + 2 * i as u64))
            .unwrap();
    }
    m.write_obj(heads.len() as u16, GuestAddress(l.avail + 2))
        .unwrap();
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// A block request at `at` (header, then `data` bytes, then the status byte) as descriptors
/// `first..first + 3`.
fn request(vm: &vmm::Vm, dev: u64, first: u16, kind: u32, sector: u64, at: u64, data: u32) {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend(0u32.to_le_bytes());
    h.extend(sector.to_le_bytes());
    vm.memory().write_slice(&h, GuestAddress(at)).unwrap();
    let dflags = if kind == 1 { NEXT } else { NEXT | WRITE };
    let f = u64::from(first);
    desc(vm, dev, f, at, 16, NEXT, first + 1);
    desc(vm, dev, f + 1, at + 0x1000, data, dflags, first + 2);
    desc(vm, dev, f + 2, at + 0x1000 + u64::from(data), 1, WRITE, 0);
}

fn image(name: &str, len: usize) -> std::path::PathBuf {
    let path = ferry_tests::process::temp_path(name);
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn run_until_done(t: &TinyVm) {
    t.vm.start().unwrap();
    wait_for("the script to end", LIMIT, || {
        t.mmio_accesses().iter().any(|a| a.write && a.offset == 0)
    });
}

/// Disk 0: a read of sectors 2..10, a write of sector 0, a get-id; disk 1 (read-only): a
/// write. The requests' data areas start at `d` and `d1`.
fn queue_requests(vm: &vmm::Vm, d: u64, d1: u64) {
    request(vm, 0, 0, 0, 2, d, 4096); // read sectors 2..10
    request(vm, 0, 3, 1, 0, d + 0x4000, 512); // write sector 0
    vm.memory()
        .write_slice(&[0xab; 512], GuestAddress(d + 0x5000))
        .unwrap();
    desc(vm, 0, 6, d + 0x8000, 16, NEXT, 7); // get-id: header, 20 bytes, status
    desc(vm, 0, 7, d + 0x9000, 20, NEXT | WRITE, 8);
    desc(vm, 0, 8, d + 0x9100, 1, WRITE, 0);
    vm.memory()
        .write_slice(&8u32.to_le_bytes(), GuestAddress(d + 0x8000))
        .unwrap();
    avail(vm, 0, &[0, 3, 6]);
    request(vm, 1, 0, 1, 0, d1, 512); // a write to the read-only disk
    avail(vm, 1, &[0]);
}

/// What [`queue_requests`] asked for is in guest RAM and on the images.
fn check_results(vm: &vmm::Vm, disk: &std::path::Path, ro: &std::path::Path, d: u64, d1: u64) {
    let m = vm.memory();
    let used_idx: u16 = m.read_obj(GuestAddress(layout(0).used + 2)).unwrap();
    assert_eq!(used_idx, 3);
    let mut got = vec![0u8; 4096];
    m.read_slice(&mut got, GuestAddress(d + 0x1000)).unwrap();
    let file = std::fs::read(disk).unwrap();
    assert_eq!(got, file[1024..5120], "the read landed");
    assert_eq!(file[..512], [0xab; 512], "the write landed");
    let status = |at: u64| -> u8 { m.read_obj(GuestAddress(at)).unwrap() };
    assert_eq!(status(d + 0x2000), 0, "read ok");
    assert_eq!(status(d + 0x5200), 0, "write ok");
    assert_eq!(status(d + 0x9100), 0, "get-id ok");
    let mut id = [0u8; 14];
    m.read_slice(&mut id, GuestAddress(d + 0x9000)).unwrap();
    assert_eq!(&id, b"virtio-rw.img\0");
    assert_eq!(
        status(d1 + 0x1200),
        1,
        "a write to a read-only disk is an I/O error"
    );
    assert_eq!(
        std::fs::read(ro).unwrap()[0],
        0,
        "and the image is unchanged"
    );
}

#[test]
fn reads_writes_and_ids_land_and_every_byte_written_is_in_the_dirty_log() {
    let disk = image("virtio-rw.img", 64 << 10);
    let ro = image("virtio-ro.img", 8 << 10);
    let t = TinyVm::with(&LONG_MMIO_SCRIPT, 1, |b| {
        b.disk(DiskConfig {
            path: disk.clone(),
            read_only: false,
        })
        .disk(DiskConfig {
            path: ro.clone(),
            read_only: true,
        })
    });
    let vm = &t.vm;
    let (d, d1) = (layout(0).data, layout(1).data);
    queue_requests(vm, d, d1);
    let mut s = Script::default();
    s.setup(0, 16);
    s.setup(1, 16);
    s.notify(0);
    let st0 = s.wait_and_status(0);
    s.notify(1);
    let st1 = s.wait_and_status(1);
    s.store(vm);
    // From here on, what the device writes is all the VMM's dirty bitmap holds.
    vm.ram().take_vmm_dirty();
    run_until_done(&t);
    assert_eq!(Script::value(vm, st0), 0xf, "device 0 status");
    assert_eq!(Script::value(vm, st1), 0xf, "device 1 status");
    check_results(vm, &disk, &ro, d, d1);

    let dirty: Vec<u64> = vm.ram().take_vmm_dirty()[0]
        .iter()
        .enumerate()
        .flat_map(|(w, bits)| {
            (0..64)
                .filter(move |b| bits >> b & 1 == 1)
                .map(move |b| w as u64 * 64 + b)
        })
        .collect();
    let page = |a: u64| a / 4096;
    let want = [
        page(layout(0).used),
        page(layout(1).used),
        page(d + 0x1000),
        page(d + 0x2000),
        page(d + 0x5000), // the write's status byte follows its data
        page(d + 0x9000),
        page(d1 + 0x1000),
    ];
    for p in &want {
        assert!(
            dirty.contains(p),
            "page {p:#x} written by the device is not in the log: {dirty:x?}"
        );
    }
    assert!(
        !dirty.contains(&page(d + 0x8000)) && !dirty.contains(&page(layout(0).desc)),
        "pages the device only read are not dirty: {dirty:x?}"
    );
}

#[test]
fn a_hostile_driver_gets_device_needs_reset_and_the_rest_goes_on() {
    let disk = image("virtio-hostile.img", 64 << 10);
    let t = TinyVm::with(&LONG_MMIO_SCRIPT, 1, |mut b| {
        for _ in 0..6 {
            b = b.disk(DiskConfig {
                path: disk.clone(),
                read_only: true,
            });
        }
        b
    });
    let vm = &t.vm;
    // 0: a data buffer outside guest RAM.
    request(vm, 0, 0, 0, 0, layout(0).data, 4096);
    desc(vm, 0, 1, 1 << 48, 4096, NEXT | WRITE, 2);
    // 1: a chain that loops.
    desc(vm, 1, 0, layout(1).data, 16, NEXT, 1);
    desc(vm, 1, 1, layout(1).data + 0x1000, 16, NEXT | WRITE, 0);
    // 2: a chain that leaves its table (next 200 in a queue of 16).
    desc(vm, 2, 0, layout(2).data, 16, NEXT, 200);
    // 3: lengths that add up past 4 GiB.
    desc(vm, 3, 0, layout(3).data, 0xffff_f000, NEXT, 1);
    desc(vm, 3, 1, layout(3).data, 0xffff_f000, WRITE, 0);
    for dev in 0..4 {
        avail(vm, dev, &[0]);
    }
    // 5: a good read, after all that.
    request(vm, 5, 0, 0, 4, layout(5).data, 1024);
    avail(vm, 5, &[0]);
    let mut s = Script::default();
    let mut statuses = Vec::new();
    for dev in 0..4 {
        s.setup(dev, 16);
        s.notify(dev);
        statuses.push(s.wait_and_status(dev));
    }
    // 4: a queue size that is not a power of two: refused at DRIVER_OK.
    s.setup(4, 3);
    statuses.push(s.wait_and_status(4));
    s.setup(5, 16);
    s.notify(5);
    let good = s.wait_and_status(5);
    s.store(vm);
    run_until_done(&t);
    for (dev, i) in statuses.iter().enumerate() {
        let st = Script::value(vm, *i);
        assert_ne!(st & NEEDS_RESET, 0, "device {dev}: status {st:#x}");
    }
    assert_eq!(Script::value(vm, good), 0xf, "the good device is fine");
    let m = vm.memory();
    let used: u16 = m.read_obj(GuestAddress(layout(5).used + 2)).unwrap();
    assert_eq!(used, 1);
    let mut got = vec![0u8; 1024];
    m.read_slice(&mut got, GuestAddress(layout(5).data + 0x1000))
        .unwrap();
    assert_eq!(got, std::fs::read(&disk).unwrap()[2048..3072]);
    // The hostile devices used nothing, and the VM runs on.
    for dev in 0..4 {
        let used: u16 = m.read_obj(GuestAddress(layout(dev).used + 2)).unwrap();
        assert_eq!(used, 0, "device {dev}");
    }
    assert_eq!(t.vm.state(), vmm::RunState::Running);
}
