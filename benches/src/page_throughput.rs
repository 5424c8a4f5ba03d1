//! Non-zero page throughput of ferry's migration path over loopback TCP: a paused VM whose
//! RAM holds no zero page is live-migrated, inside this process, to a receiver on another
//! thread (real KVM VMs on both sides, a real TCP connection), and the report's end-to-end
//! bandwidth is printed: bytes on the wire over the time spent sending them, the destination
//! having written every page into its guest RAM (the Sync after each round).
//!
//!     cargo build --release --workspace
//!     target/release/page-throughput [--memory 1G] [--runs 5]
//!
//! Needs /dev/kvm. Run by hand, never in CI.

use std::net::{TcpListener, TcpStream};

use anyhow::{bail, Context, Result};
use ferry_benches::stats;
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::{layout::BOOT_STACK_TOP, EntryPoint};

fn main() -> Result<()> {
    let mut memory = 1u64 << 30;
    let mut runs = 5;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--memory" => memory = vmm::config::parse_size(&val()?)?,
            "--runs" => runs = val()?.parse()?,
            other => bail!("unknown argument {other:?} (expected --memory SIZE, --runs N)"),
        }
    }
    ferry_tests::require_kvm();
    let (mut rates, mut totals) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let image = ferry_tests::tiny::LONG_STORM;
        let mut src = vmm::Vm::new(memory, 1, Box::new(std::io::sink()))?;
        src.boot_raw(
            image.bytes,
            image.addr,
            EntryPoint::Long64 {
                rip: image.addr,
                rsp: BOOT_STACK_TOP,
            },
        )?;
        // Every page distinct and not zero; the guest never runs.
        let mut chunk = vec![0u8; 1 << 20];
        for (start, len) in src.ram_regions() {
            for off in (0..len).step_by(chunk.len()) {
                let gpa = start + off;
                for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
                    w.copy_from_slice(&(gpa + 8 * i as u64 + 1).to_le_bytes());
                }
                src.memory().write_slice(&chunk, GuestAddress(gpa))?;
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let dest = std::thread::spawn(move || -> Result<vmm::Vm> {
            let (s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            Ok(vmm::migrate::receive_over(
                s,
                None,
                Box::new(std::io::sink()),
            )?)
        });
        let conn = TcpStream::connect(addr)?;
        conn.set_nodelay(true)?;
        let report =
            vmm::migrate::send_over(&src, conn, &vmm::migrate::Options::default(), &mut |_| {})?;
        let dest = dest.join().expect("receiver thread")?;
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        for gpa in [0u64, memory / 2, memory - 4096] {
            src.memory().read_slice(&mut a, GuestAddress(gpa))?;
            dest.memory().read_slice(&mut b, GuestAddress(gpa))?;
            if a != b {
                bail!("page {gpa:#x} differs at the destination");
            }
        }
        eprintln!(
            "run {run}: {:.0} MB/s, {:.1} MiB in {:.1} ms, {} rounds",
            report.bandwidth_mbps,
            report.bytes as f64 / 1048576.0,
            report.total_ms,
            report.rounds
        );
        rates.push(report.bandwidth_mbps);
        totals.push(report.total_ms);
    }
    let (lo, med, hi) = stats(&rates);
    println!(
        "non-zero page throughput over loopback TCP, {} MiB: {lo:.0} / {med:.0} / {hi:.0} MB/s (min/median/max of {runs}); total {:.1} ms median",
        memory >> 20,
        stats(&totals).1
    );
    Ok(())
}
