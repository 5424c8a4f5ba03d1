//! The destination side: the CPU check, memory into guest RAM, the state, Commit.

use std::io::{BufReader, Read, Write};
use std::time::{Duration, Instant};

use cpuid::profile::CpuProfile;
use cpuid::CpuidDump;
use migration::auth::Key;
use migration::protocol::{self, Hello, Message, Precopy};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::vm::Vm;

use super::*;

/// How the destination takes a VM.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Check the CPU profile against this recorded host instead of this one.
    pub host: Option<CpuidDump>,
    /// Take only a source that proves this key (and prove it to the source).
    pub key: Option<Key>,
    /// Give up on a source that sends or takes nothing for this long.
    pub peer_timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            host: None,
            key: None,
            peer_timeout: PEER_TIMEOUT,
        }
    }
}

/// Destination side: waits at `addr` for one VM, checks its CPU profile against this host
/// (or a recorded one) before any memory is sent, receives its memory and state, and once
/// the source has committed, calls `start` (which runs the guest) and confirms Running to
/// the source, or Failed with `start`'s error (the source then resumes it).
/// With a key, only a source that proves it is taken (and this side proves it too);
/// without one, only a Unix socket or a loopback address may be listened on.
pub fn receive(
    addr: &Address,
    opts: &ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
) -> Result<Vm, Error> {
    if opts.key.is_none() {
        check_local(addr)?;
    }
    receive_from(Listener::bind(addr)?, opts, console, start)
}

/// [`receive`] on a listener bound already.
pub fn receive_from(
    listener: Listener,
    opts: &ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
) -> Result<Vm, Error> {
    let conn = listener.accept(opts.peer_timeout)?;
    receive_with(conn, opts, console, start)
}

/// [`receive`] over a connected stream, without a key; the VM comes back paused (the
/// source is told Running: the caller starts it).
pub fn receive_over(
    conn: impl Read + Write,
    host: Option<&CpuidDump>,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Vm, Error> {
    let opts = ReceiveOptions {
        host: host.cloned(),
        ..Default::default()
    };
    receive_with(conn, &opts, console, |_| Ok(()))
}

/// [`receive`] over a connected stream (its timeouts set by the caller).
pub fn receive_with(
    mut conn: impl Read + Write,
    opts: &ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
) -> Result<Vm, Error> {
    let (host, key) = (opts.host.as_ref(), opts.key.as_ref());
    let refuse = |mut conn: &mut dyn Write, reason: String| {
        let _ = protocol::send(&mut conn, &Message::Refuse(reason.clone()));
        Error::RefusedHere(reason)
    };
    let hs = |what| proto(Phase::Handshake, what);
    let mut first = protocol::recv(&mut conn).map_err(hs("waiting for Hello"))?;
    match (key, &first) {
        (Some(key), Message::AuthChallenge(ns)) => {
            let ns = *ns;
            let nd = nonce()?;
            let proof = key.destination_proof(&ns, &nd);
            protocol::send(&mut conn, &Message::AuthResponse(nd, proof))
                .map_err(hs("authenticating"))?;
            match protocol::recv(&mut conn).map_err(hs("authenticating"))? {
                Message::AuthProof(p) if key.check_source(&nd, &ns, &p).is_ok() => {}
                _ => {
                    return Err(refuse(
                        &mut conn,
                        "the source could not prove the shared key".into(),
                    ))
                }
            }
            first = protocol::recv(&mut conn).map_err(hs("waiting for Hello"))?;
        }
        (Some(_), other) => {
            let reason = format!(
                "this destination takes only a source that proves the shared key (--key-file); it sent {} first",
                other.name()
            );
            return Err(refuse(&mut conn, reason));
        }
        (None, Message::AuthChallenge(_)) => {
            let reason = "this destination has no key (--key-file): it takes unauthenticated migrations only".to_string();
            return Err(refuse(&mut conn, reason));
        }
        (None, _) => {}
    }
    let hello = match first {
        Message::Hello(h) => h,
        other => {
            return Err(Error::RefusedHere(format!(
                "expected Hello, got {}",
                other.name()
            )))
        }
    };
    if let Err(reason) = acceptable(&hello, host) {
        return Err(refuse(&mut conn, reason));
    }
    // RAM first (an mmap: at once); the rest of the machine (KVM, memslots, vCPUs, CPUID)
    // is built on another thread while round 0's pages arrive into that RAM.
    let ram = crate::memory::GuestRam::new(hello.memory)
        .map_err(|e| refuse(&mut conn, format!("cannot create the VM here: {e}")))?;
    let mem = ram.memory().clone();
    let (vcpus, profile_json) = (hello.vcpus, hello.cpu_profile.clone());
    let saved = hello.guest_cpu.clone();
    let mut building = Some(
        std::thread::Builder::new()
            .name("mig-build".into())
            .spawn(move || {
                crate::vm::VmBuilder::new(0, vcpus)
                    .ram(ram)
                    .console(console)
                    .cpu(crate::vm::CpuChoice::Saved {
                        profile_json,
                        guest_cpu: saved,
                    })
                    .build(crate::vm::Boot::Restored)
            })
            .map_err(|e| refuse(&mut conn, format!("cannot create the VM here: {e}")))?,
    );
    let mut built: Option<Vm> = None;
    protocol::send(&mut conn, &Message::Accept).map_err(hs("sending Accept"))?;
    let regions: Vec<(u64, u64)> = {
        use vm_memory::GuestMemoryRegion;
        mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
    };
    // The machine is needed by the first Sync (the end of round 0) at the latest.
    let mut finish_building = |conn: &mut dyn Write| -> Result<(), Error> {
        if let Some(b) = building.take() {
            let vm = b
                .join()
                .map_err(|_| Error::Restore("building the VM panicked".into()))
                .and_then(|r| r.map_err(|e| Error::Restore(format!("creating the VM: {e}"))));
            match vm {
                Ok(vm) => built = Some(vm),
                Err(e) => {
                    let mut conn = conn;
                    let _ = protocol::send(&mut conn, &Message::Failed(e.to_string()));
                    return Err(e);
                }
            }
        }
        Ok(())
    };
    // Round 0 fills fresh RAM: back it ahead of the pages (super::prefault).
    let mut readahead = Some(super::prefault::Prefault::start(mem.clone()));
    // The round of the last page frame: the phase errors name.
    let mut round = 0;
    loop {
        let phase = Phase::Memory { round };
        match protocol::recv_precopy(&mut conn).map_err(proto(phase, "receiving memory"))? {
            Precopy::Pages(head) => {
                round = head.round;
                if let Some(r) = &mut readahead {
                    r.frame(&head.runs);
                }
                receive_pages(&mem, &regions, head, &mut conn, Phase::Memory { round })?
            }
            Precopy::Touched(words) => {
                // In round 0 only (the readahead's lifetime): it says which RAM it fills.
                let Some(r) = readahead.as_mut() else {
                    return Err(proto(phase, "receiving memory")(
                        protocol::Error::Unexpected {
                            expected: "Pages, Sync, Cancel or State",
                            found: "Touched".into(),
                        },
                    ));
                };
                let ram_end = regions.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
                let expected = protocol::touched_words(ram_end);
                if words.len() != expected {
                    return Err(Error::BadTouchedMap {
                        words: words.len(),
                        expected,
                    });
                }
                r.touched(&words);
            }
            Precopy::Cancel(reason) => return Err(Error::CancelledBySource(reason)),
            Precopy::Sync => {
                // The end of round 0: later rounds rewrite pages already there.
                readahead = None;
                finish_building(&mut conn)?;
                protocol::send(&mut conn, &Message::Synced)
                    .map_err(proto(phase, "sending Synced"))?;
            }
            Precopy::State => {
                drop(readahead);
                finish_building(&mut conn)?;
                break;
            }
        }
    }
    let Some(mut vm) = built else {
        return Err(Error::Restore("the VM was not built".into()));
    };
    let state =
        migration::stream::read_vm_until_end(&mut BufReader::new(&mut conn)).map_err(|e| {
            use migration::stream::Error as S;
            let e = match e {
                S::Io { source, .. } => source,
                S::Truncated { .. } => std::io::ErrorKind::UnexpectedEof.into(),
                other => std::io::Error::other(other.to_string()),
            };
            io(Phase::Switchover, "receiving the VM state")(e)
        })?;
    let got_state = Instant::now();
    let loaded = if state.cpu_profile != hello.cpu_profile
        || state.config.memory != hello.memory
        || state.config.vcpus != hello.vcpus
    {
        Err("the VM state does not match the Hello (memory, vCPUs or CPU profile)".to_string())
    } else {
        vm.restore_state(&state).map_err(|e| e.to_string())
    };
    if let Err(e) = loaded {
        let _ = protocol::send(&mut conn, &Message::Failed(e.clone()));
        return Err(Error::Restore(e));
    }
    protocol::send(&mut conn, &Message::Restored)
        .map_err(proto(Phase::Switchover, "sending Restored"))?;
    log::debug!("receive: state loaded in {:?}", got_state.elapsed());
    match protocol::recv(&mut conn) {
        Ok(Message::Commit) => {}
        Ok(other) => return Err(Error::NoCommit(format!("got {}", other.name()))),
        Err(e) => return Err(Error::NoCommit(e.to_string())),
    }
    // The guest is this side's now.
    match start(&vm) {
        Ok(()) => {
            if let Err(e) = protocol::send(&mut conn, &Message::Running) {
                // The source keeps its copy paused and says the guest may run here.
                log::warn!(
                    "confirming Running to the source (phase: {}): {e}",
                    Phase::AfterCommit
                );
            }
            Ok(vm)
        }
        Err(e) => {
            // Not running here: the source resumes its copy.
            let _ = protocol::send(&mut conn, &Message::Failed(e.clone()));
            Err(Error::Restore(format!(
                "starting the guest (phase: {}): {e}; the source keeps it",
                Phase::AfterCommit
            )))
        }
    }
}

/// Receives a page frame whose head has been read: checks that every run lies inside one
/// RAM region before reading any page, reads the pages straight into guest RAM, checks the
/// CRC, then zeroes the ZERO runs. The destination's vCPUs have not run yet.
fn receive_pages(
    mem: &crate::memory::GuestMemoryMmap,
    regions: &[(u64, u64)],
    mut head: migration::pages::FrameHead,
    conn: &mut impl Read,
    phase: Phase,
) -> Result<(), Error> {
    for run in &head.runs {
        let inside = regions
            .iter()
            .any(|&(start, len)| run.gpa >= start && run.gpa + run.len() <= start + len);
        if !inside {
            return Err(Error::PagesOutsideRam {
                gpa: run.gpa,
                len: run.len(),
            });
        }
    }
    let runs = std::mem::take(&mut head.runs);
    for run in runs.iter().filter(|r| !r.zero) {
        let len = run.len() as usize;
        let host =
            mem.get_host_address(GuestAddress(run.gpa))
                .map_err(|_| Error::PagesOutsideRam {
                    gpa: run.gpa,
                    len: run.len(),
                })?;
        // SAFETY: the run lies inside one RAM region (checked above), so [host, host + len)
        // is within that region's mapping, which `mem` keeps alive for longer than this
        // borrow. No vCPU of this VM has run yet and nothing else in ferry holds a reference
        // into this memory (the thread building the VM only registers it with KVM), so the
        // mutable slice is the only access while it lives.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, len) };
        // In pieces that stay in cache between the copy from the socket and the CRC.
        for piece in bytes.chunks_mut(CRC_PIECE) {
            conn.read_exact(piece)
                .map_err(io(phase, "receiving memory"))?;
            head.crc_update(piece);
        }
    }
    head.check_crc(conn)
        .map_err(|e| proto(phase, "receiving memory")(e.into()))?;
    static ZEROS: [u8; migration::pages::PAGE_SIZE] = [0; migration::pages::PAGE_SIZE];
    for run in runs.iter().filter(|r| r.zero) {
        (0..u64::from(run.pages))
            .try_for_each(|i| mem.write_slice(&ZEROS, GuestAddress(run.gpa + i * PAGE)))
            .map_err(|_| Error::PagesOutsideRam {
                gpa: run.gpa,
                len: run.len(),
            })?;
    }
    Ok(())
}

/// Whether this host can take the VM a Hello describes; the reason if not.
fn acceptable(h: &Hello, host: Option<&CpuidDump>) -> Result<(), String> {
    use migration::limits::{FORMAT_VERSION, OLDEST_FORMAT_VERSION};
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&h.format_version) {
        return Err(format!(
            "stream format version {}, this ferry reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}",
            h.format_version,
        ));
    }
    // The machine's size, checked here so that a Hello this host cannot build is refused
    // before Accept (the machine is built while pages arrive).
    let kvm = crate::vm::open_kvm().map_err(|e| e.to_string())?;
    crate::config::validate_memory(h.memory)
        .and_then(|()| crate::config::validate_vcpus(h.vcpus, crate::vm::max_vcpus(&kvm)))
        .map_err(|e| format!("cannot create the VM here: {e}"))?;
    let profile = CpuProfile::from_json("the source's CPU profile", &h.cpu_profile)
        .map_err(|e| e.to_string())?;
    let live;
    let host = match host {
        Some(h) => h,
        None => {
            live = crate::cpu_model::host_dump(&kvm).map_err(|e| e.to_string())?;
            &live
        }
    };
    if !profile.migratable && host.vendor() != Some(profile.identity.vendor) {
        return Err(format!(
            "CPU profile {} describes one host and is not migratable to a host of another vendor",
            profile.name
        ));
    }
    cpuid::profile::check(&profile, host)
        .map_err(|m| format!("this host cannot run CPU profile {}: {m}", profile.name))?;
    // The guest CPU as the source runs it against what this host's KVM makes of the
    // profile: refused here, before Accept, rather than by the machine built after it.
    let here = crate::admit::probe(&kvm, &profile, h.vcpus)
        .map_err(|e| format!("cannot create the VM here: {e}"))?;
    crate::admit::admit(h.guest_cpu.as_ref(), &profile, h.vcpus, &here).map(|_| ())
}
