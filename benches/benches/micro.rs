//! Micro-benchmarks (criterion) of the migration's hot paths:
//! - page frames: encoding 512 pages (2 MiB) into a frame and decoding one;
//! - zero detection: `is_zero` over zero pages (the worst case: every byte read);
//! - untouched detection: pagemap over 1 GiB of guest RAM;
//! - dirty tracking: harvesting KVM's dirty log and ferry's bitmap for 1 GiB, and scanning a
//!   1 GiB bitmap with one page in eight set;
//! - vCPU and device state: saving a paused VM's state and loading it into a new VM, with 1
//!   and 4 vCPUs.
//!
//!     cargo bench -p ferry-benches --bench micro
//!
//! Needs /dev/kvm for the last three groups.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use migration::pages::{decode, is_zero, BatchWriter, PAGE_SIZE};
use vm_memory::GuestMemoryBackend;
use vmm::boot::{layout::BOOT_STACK_TOP, EntryPoint};

const GIB: u64 = 1 << 30;

/// A VM with the (never started) storm guest loaded: paused vCPUs with real state.
fn vm(memory: u64, vcpus: u32) -> vmm::Vm {
    ferry_tests::require_kvm();
    let image = ferry_tests::tiny::LONG_STORM;
    vmm::vm::VmBuilder::new(memory, vcpus)
        .build(vmm::vm::Boot::Raw {
            image: image.bytes,
            addr: image.addr,
            entry: EntryPoint::Long64 {
                rip: image.addr,
                rsp: BOOT_STACK_TOP,
            },
        })
        .expect("a VM with the guest loaded")
}

fn pages(c: &mut Criterion) {
    let src: Vec<u8> = (0..512 * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
    let mut g = c.benchmark_group("pages");
    g.throughput(Throughput::Bytes(src.len() as u64));
    let mut w = BatchWriter::new();
    g.bench_function("encode a 2 MiB frame", |b| {
        b.iter(|| {
            for (i, p) in src.chunks_exact(PAGE_SIZE).enumerate() {
                w.page_slot().copy_from_slice(p);
                w.commit_page(i as u64 * PAGE_SIZE as u64, false);
            }
            black_box(w.finish().len());
            w.reset();
        })
    });
    g.bench_function("encode a 2 MiB frame in place (no copy)", |b| {
        b.iter(|| {
            for (i, p) in src.chunks_exact(PAGE_SIZE).enumerate() {
                w.commit_in_place(i as u64 * PAGE_SIZE as u64, p, false);
            }
            black_box(w.finish().len());
            w.reset();
        })
    });
    for (i, p) in src.chunks_exact(PAGE_SIZE).enumerate() {
        w.page_slot().copy_from_slice(p);
        w.commit_page(i as u64 * PAGE_SIZE as u64, false);
    }
    let frame = w.finish().to_vec();
    g.bench_function("decode a 2 MiB frame (CRC included)", |b| {
        b.iter(|| black_box(decode(&frame[8..]).unwrap().runs.len()))
    });
    let zero = vec![0u8; 1 << 20];
    g.throughput(Throughput::Bytes(zero.len() as u64));
    g.bench_function("is_zero over 1 MiB of zero pages", |b| {
        b.iter(|| {
            black_box(
                zero.chunks_exact(PAGE_SIZE)
                    .filter(|p| is_zero(black_box(p)))
                    .count(),
            )
        })
    });
    g.finish();
}

fn dirty(c: &mut Criterion) {
    let vm = vm(GIB, 1);
    vm.ram().set_dirty_tracking(true).expect("dirty tracking");
    let mut g = c.benchmark_group("memory tracking, 1 GiB");
    g.throughput(Throughput::Bytes(GIB));
    g.bench_function("harvest KVM_GET_DIRTY_LOG and the VMM bitmap", |b| {
        b.iter(|| black_box(vm.ram().take_dirty().unwrap()))
    });
    g.bench_function("untouched pages from pagemap", |b| {
        b.iter(|| black_box(vm.ram().touched_pages()))
    });
    let pagemap = vmm::memory::Pagemap::open();
    let host = vm
        .ram()
        .memory()
        .get_host_address(vm_memory::GuestAddress(0))
        .expect("RAM at 0") as u64;
    let pages = (GIB / PAGE_SIZE as u64) as usize;
    let mut bits = vec![0u64; pages / 64];
    g.bench_function(
        "untouched pages from pagemap entries (kernels before 6.7)",
        |b| b.iter(|| pagemap.mark_touched_by_reading(host, pages, black_box(&mut bits))),
    );
    g.bench_function("untouched pages by PAGEMAP_SCAN", |b| {
        b.iter(|| pagemap.mark_touched_by_scan(host, pages, black_box(&mut bits)))
    });
    let words = (GIB / PAGE_SIZE as u64 / 64) as usize;
    let bits: Vec<u64> = (0..words)
        .map(|i| 0x0101_0101_0101_0101u64.rotate_left(i as u32))
        .collect();
    g.bench_function("scan a bitmap with 1 page in 8 dirty", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for (w, word) in bits.iter().enumerate() {
                let mut x = *word;
                while x != 0 {
                    sum += w as u64 * 64 + u64::from(x.trailing_zeros());
                    x &= x - 1;
                }
            }
            black_box(sum)
        })
    });
    g.finish();
}

fn state(c: &mut Criterion) {
    let mut g = c.benchmark_group("VM state");
    for vcpus in [1u32, 4] {
        let vm = vm(64 << 20, vcpus);
        let saved = vm.save_state_with(false).expect("save");
        g.bench_with_input(BenchmarkId::new("save", vcpus), &vcpus, |b, _| {
            b.iter(|| black_box(vm.save_state_with(false).unwrap()))
        });
        g.bench_with_input(
            BenchmarkId::new("load into a new VM", vcpus),
            &vcpus,
            |b, _| {
                b.iter_batched(
                    || {
                        vmm::vm::VmBuilder::new(64 << 20, vcpus)
                            .cpu(vmm::vm::CpuChoice::Saved {
                                profile_json: saved.cpu_profile.clone(),
                                guest_cpu: saved.guest_cpu.clone(),
                            })
                            .build(vmm::vm::Boot::Restored)
                            .unwrap()
                    },
                    |mut v| {
                        v.restore_state(&saved).unwrap();
                        v
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = micro;
    config = Criterion::default().sample_size(20);
    targets = pages, dirty, state
}
criterion_main!(micro);
