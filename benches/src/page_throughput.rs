//! Non-zero page throughput of ferry's migration path over loopback TCP: a VM whose RAM
//! holds no zero page is live-migrated, inside this process, to a receiver on another thread
//! (real KVM VMs on both sides, a real TCP connection), and the report's end-to-end
//! bandwidth is printed: bytes on the wire over the time spent sending them, the destination
//! having written every page into its guest RAM (the Sync after each round).
//!
//!     cargo build --release --workspace
//!     target/release/page-throughput [--memory 1G] [--runs 5] [--running]
//!
//! By default the VM's vCPU never runs: the guest cannot write its RAM, so ferry sends each
//! page from where it lies (as it does for any guest's last round). With `--running` the
//! vCPU runs (halted in a loop of `hlt`, so that it takes no CPU from the migration): the
//! rounds take the path of a running guest, each page copied into the frame first.
//!
//! Each run also migrates the same VM over TLS 1.3 (certificates made for the run, both
//! sides authenticated, as `--tls-dir` does): the ratio TLS / plaintext is encryption's cost.
//!
//! Each run is paired with a floor, measured just before it on the same host: the same bytes
//! moved by the least work any page path over TCP can do, one `write` per 2 MiB straight
//! from the source VM's RAM and `read`s straight into a fresh VM's RAM (no frames, no CRC,
//! no dirty log), so the destination's kernel still zeroes its new RAM on first touch as it
//! does for ferry. The ratio ferry / floor is what the page path costs above the host's own
//! limit; the floor is what the host allows at all. A first pair warms up and is not
//! counted; then the floor goes first in odd runs and ferry in even ones.
//!
//! Needs /dev/kvm. Run by hand, never in CI.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferry_benches::stats;
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::{layout::BOOT_STACK_TOP, EntryPoint};

fn main() -> Result<()> {
    let mut memory = 1u64 << 30;
    let mut runs = 5;
    let mut running = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--memory" => memory = vmm::config::parse_size(&val()?)?,
            "--runs" => runs = val()?.parse()?,
            "--running" => running = true,
            "--help" | "-h" => {
                print!(
                    "usage: page-throughput [--memory SIZE] [--runs N] [--running]\n  \
                     --memory SIZE  guest RAM moved per run (default 1G)\n  \
                     --runs N       runs, each paired with the host's floor (default 5)\n  \
                     --running      the source's vCPU runs (halted): the path of a running\n                 \
                     guest, pages copied into the frame (default: a paused guest's)\n"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    ferry_tests::require_kvm();
    // Certificates for the encrypted runs, made here (as `ferry tls generate` does).
    let certs = std::env::temp_dir().join(format!("ferry-page-tls-{}", std::process::id()));
    let g = vmm::migrate::TlsGenerate::new(&certs, vec!["127.0.0.1".into()]);
    vmm::migrate::tls_generate(&certs, &g)?;
    let result = measure(memory, runs, running, &certs);
    let _ = std::fs::remove_dir_all(&certs);
    let _ = std::fs::remove_file(&g.ca_key);
    result
}

/// One run: the floor, ferry in plaintext and ferry over TLS, each of the same VM.
struct Run {
    floor: f64,
    plain: vmm::migrate::Report,
    tls: vmm::migrate::Report,
}

fn one_run(run: usize, memory: u64, running: bool, certs: &Path) -> Result<Run> {
    let src = source(memory, running)?;
    // The floor goes first in odd runs and ferry in even ones; plaintext and TLS alternate.
    let floor_first = run % 2 == 1;
    let floor_before = if floor_first {
        Some(floor(&src, memory)?)
    } else {
        None
    };
    let (plain, tls) = if run % 2 == 0 {
        let p = ferry(&src, memory, None)?;
        (p, ferry(&src, memory, Some(certs))?)
    } else {
        let t = ferry(&src, memory, Some(certs))?;
        (ferry(&src, memory, None)?, t)
    };
    let floor = match floor_before {
        Some(f) => f,
        None => floor(&src, memory)?,
    };
    Ok(Run { floor, plain, tls })
}

fn measure(memory: u64, runs: usize, running: bool, certs: &Path) -> Result<()> {
    let (mut rates, mut tls_rates, mut totals, mut floors, mut ratios, mut tls_ratios) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    // Run 0 warms up and is not counted: the first RAM a process touches is the slowest
    // here (see the floor above).
    for run in 0..=runs {
        let Run { floor, plain, tls } = one_run(run, memory, running, certs)?;
        let ratio = plain.bandwidth_mbps / floor;
        let tls_ratio = tls.bandwidth_mbps / plain.bandwidth_mbps;
        eprintln!(
            "{}: {:.0} MB/s, {:.1} MiB in {:.1} ms, {} rounds; TLS {:.0} MB/s in {:.1} ms; floor {floor:.0} MB/s; ferry/floor {ratio:.2}, TLS/plaintext {tls_ratio:.2}",
            if run == 0 { "warm-up".to_string() } else { format!("run {run}") },
            plain.bandwidth_mbps,
            plain.bytes as f64 / 1048576.0,
            plain.total_ms,
            plain.rounds,
            tls.bandwidth_mbps,
            tls.total_ms,
        );
        if run > 0 {
            rates.push(plain.bandwidth_mbps);
            tls_rates.push(tls.bandwidth_mbps);
            totals.push(plain.total_ms);
            floors.push(floor);
            ratios.push(ratio);
            tls_ratios.push(tls_ratio);
        }
    }
    let (lo, med, hi) = stats(&rates);
    println!(
        "non-zero page throughput over loopback TCP, {} MiB, {} guest: {lo:.0} / {med:.0} / {hi:.0} MB/s (min/median/max of {runs}); total {:.1} ms median",
        memory >> 20,
        if running { "running" } else { "paused" },
        stats(&totals).1
    );
    let (lo, med, hi) = stats(&tls_rates);
    println!("over TLS 1.3 (certificates, AES-128-GCM): {lo:.0} / {med:.0} / {hi:.0} MB/s");
    let (lo, med, hi) = stats(&floors);
    println!("floor (plain writes and reads, RAM to fresh RAM): {lo:.0} / {med:.0} / {hi:.0} MB/s");
    let (lo, med, hi) = stats(&ratios);
    println!("ferry / floor, run by run: {lo:.2} / {med:.2} / {hi:.2}");
    let (lo, med, hi) = stats(&tls_ratios);
    println!("TLS / plaintext, run by run: {lo:.2} / {med:.2} / {hi:.2}");
    println!("host memory: {}", ferry_benches::page_reporting());
    Ok(())
}

/// A VM whose RAM holds no zero page (every page distinct, but for the few bytes booting
/// wrote) and whose vCPU, if `running`, runs a loop of `hlt`, else never runs.
fn source(memory: u64, running: bool) -> Result<vmm::Vm> {
    /// hlt; jmp back to the hlt.
    const HLT_LOOP: [u8; 3] = [0xf4, 0xeb, 0xfd];
    const ADDR: u64 = 0x10_0000;
    let ram = vmm::memory::GuestRam::new(memory)?;
    let mut chunk = vec![0u8; 1 << 20];
    for (start, len) in ram.regions() {
        for off in (0..len).step_by(chunk.len()) {
            let gpa = start + off;
            for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&(gpa + 8 * i as u64 + 1).to_le_bytes());
            }
            ram.memory().write_slice(&chunk, GuestAddress(gpa))?;
        }
    }
    let src = vmm::vm::VmBuilder::new(memory, 1)
        .ram(ram)
        .build(vmm::vm::Boot::Raw {
            image: &HLT_LOOP,
            addr: ADDR,
            entry: EntryPoint::Long64 {
                rip: ADDR,
                rsp: BOOT_STACK_TOP,
            },
        })?;
    if running {
        src.start()?;
    }
    Ok(src)
}

/// One ferry migration of `src` to a receiver thread over loopback TCP, through ferry's own
/// listener and connect, over TLS with the certificates in `tls` if given; checks a few pages
/// arrived.
fn ferry(src: &vmm::Vm, memory: u64, tls: Option<&Path>) -> Result<vmm::migrate::Report> {
    use vmm::migrate::{Address, DestinationTls, Listener, ReceiveOptions, SourceTls};
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = Address::Tcp(format!("127.0.0.1:{port}"));
    let listener = Listener::bind(&addr)?;
    let ropts = ReceiveOptions {
        tls: tls.map(DestinationTls::load).transpose()?,
        ..Default::default()
    };
    let dest = std::thread::spawn(move || -> Result<vmm::Vm> {
        let sink = Box::new(std::io::sink());
        Ok(vmm::migrate::receive_from(listener, ropts, sink, |_| {
            Ok(())
        })?)
    });
    let opts = vmm::migrate::Options {
        tls: tls.map(|d| SourceTls::load(d, "127.0.0.1")).transpose()?,
        ..Default::default()
    };
    let report = vmm::migrate::send(src, &Default::default(), &addr, &opts, &mut |_| {})?;
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
    Ok(report)
}

/// The floor: all of `src`'s RAM over a loopback TCP connection into a fresh VM's RAM with
/// plain writes and reads of 2 MiB, timed from the first write until the receiver has read
/// the last byte; MB/s.
fn floor(src: &vmm::Vm, memory: u64) -> Result<f64> {
    const CHUNK: u64 = 2 << 20;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let regions = src.ram().regions();
    let dest = std::thread::spawn(move || -> Result<()> {
        let dest = vmm::vm::VmBuilder::new(memory, 1).build(vmm::vm::Boot::Restored)?;
        let (mut s, _) = listener.accept()?;
        for (start, len) in dest.ram().regions() {
            let mut off = 0;
            while off < len {
                let n = CHUNK.min(len - off) as usize;
                match dest
                    .memory()
                    .read_volatile_from(GuestAddress(start + off), &mut s, n)?
                {
                    0 => bail!("the floor's sender closed early"),
                    got => off += got as u64,
                }
            }
        }
        s.write_all(b"k")?;
        Ok(())
    });
    let send = || -> Result<f64> {
        let mut conn = TcpStream::connect(addr)?;
        conn.set_nodelay(true)?;
        let started = std::time::Instant::now();
        let mut bytes = 0;
        for (start, len) in regions {
            for off in (0..len).step_by(CHUNK as usize) {
                let n = CHUNK.min(len - off) as usize;
                src.memory()
                    .write_all_volatile_to(GuestAddress(start + off), &mut conn, n)?;
                bytes += n;
            }
        }
        let mut ack = [0u8; 1];
        conn.read_exact(&mut ack)?;
        Ok(bytes as f64 / started.elapsed().as_secs_f64() / 1e6)
    };
    let sent = send();
    dest.join().expect("floor receiver thread")?;
    sent
}
