//! The destination side: the CPU check, memory into guest RAM, the state, Commit.

use std::io::{BufReader, Read, Write};
use std::time::{Duration, Instant};

use cpuid::CpuidDump;
use migration::auth::Key;
use migration::protocol::{self, Hello, Message, Precopy};
use migration::receiver::{Action, Failure, Input, Receiver};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::virtio::backends::{Backends, Opened as HostDevices};

use super::admission::{acceptable, host_memory_limit, host_vcpu_limit, within_limits};
use crate::vm::Vm;

use super::*;

/// How the destination takes a VM.
#[derive(Debug)]
pub struct ReceiveOptions {
    /// Check the CPU profile against this recorded host instead of this one.
    pub host: Option<CpuidDump>,
    /// Take only a source that proves this key (and prove it to the source), inside TLS.
    pub key: Option<Key>,
    /// TLS with certificates (--tls-dir): only a source whose certificate the CA signed.
    pub tls: Option<DestinationTls>,
    /// Give up on a migration that has not handed over the guest this long after the
    /// source connected (plus at most one peer timeout for the read under way).
    pub deadline: Duration,
    /// Give up on a source that sends or takes nothing for this long.
    pub peer_timeout: Duration,
    /// The disks and taps this side opened (`--disk`, `--net`): the only ones a guest is
    /// taken onto; a guest with devices is refused without them.
    pub devices: HostDevices,
    /// The most guest RAM this side takes (a larger Hello is refused before anything is
    /// allocated); see [`host_memory_limit`].
    pub max_memory: u64,
    /// The most vCPUs this side takes.
    pub max_vcpus: u32,
}

/// How long a destination waits for a whole migration by default.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(3600);

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            host: None,
            key: None,
            tls: None,
            deadline: DEFAULT_DEADLINE,
            peer_timeout: PEER_TIMEOUT,
            devices: HostDevices::none(),
            max_memory: host_memory_limit(),
            max_vcpus: host_vcpu_limit(),
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
    opts: ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
) -> Result<Vm, Error> {
    if opts.key.is_none() && opts.tls.is_none() {
        check_local(addr)?;
    }
    receive_from(Listener::bind(addr)?, opts, console, start)
}

/// [`receive`] on a listener bound already: [`super::accept_source`], then
/// [`receive_source`] on the calling thread.
pub fn receive_from(
    listener: Listener,
    opts: ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
) -> Result<Vm, Error> {
    let source = super::handshakes::accept_source(listener, &opts)?;
    receive_source(source, opts, console, start)
}

/// Receives the VM from a source that has connected and authenticated
/// ([`super::accept_source`]): its `--deadline` bounds every read and write until the guest
/// is handed over. `ferry receive` runs this on a thread of its own, filtered as the
/// receiver: it parses the source's stream.
pub fn receive_source(
    source: super::handshakes::Source,
    opts: ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
) -> Result<Vm, Error> {
    let super::handshakes::Source { conn, lifted, .. } = source;
    receive_on(conn, opts, console, start, &|| {
        lifted.store(true, std::sync::atomic::Ordering::Relaxed)
    })
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
    receive_with(conn, opts, console, |_| Ok(()))
}

/// [`receive`] over a connected stream (its timeouts set by the caller): the I/O around
/// migration::receiver's state machine, which decides every step.
pub fn receive_with(
    conn: impl Read + Write,
    opts: ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
) -> Result<Vm, Error> {
    receive_on(conn, opts, console, start, &|| {})
}

/// [`receive_with`], calling `handed_over` once the source has been told Running.
fn receive_on(
    mut conn: impl Read + Write,
    mut opts: ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
    handed_over: &dyn Fn(),
) -> Result<Vm, Error> {
    let began = std::time::Instant::now();
    let mut rx = Receiver::new();
    let mut d = Driver {
        conn: &mut conn,
        console: Some(console),
        hello: None,
        devices: None,
        mem: None,
        regions: Vec::new(),
        building: None,
        vm: None,
        readahead: None,
        pages: None,
        missing: None,
        postcopy: None,
    };
    let mut start = Some(start);
    // The outcome of an action the machine waits for, handed to it instead of a read.
    let mut outcome: Option<Input> = None;
    loop {
        let input = match outcome.take() {
            Some(i) => i,
            None if began.elapsed() > opts.deadline => {
                let why = format!(
                    "its deadline of {} s passed (phase: {}); the source keeps the guest",
                    opts.deadline.as_secs(),
                    rx.phase()
                );
                let _ = protocol::send(&mut d.conn, &Message::Failed(why.clone()));
                return Err(Error::Deadline(why));
            }
            None => d.read(&rx)?,
        };
        let action = match rx.step(input) {
            Ok(a) => a,
            Err(f) => return Err(d.fail(f)),
        };
        let phase = rx.phase();
        match action {
            Action::Next => {}
            Action::Reply(m) => {
                protocol::send(&mut d.conn, &m).map_err(proto(phase, "answering the source"))?;
            }
            Action::CheckHello(h) => {
                let ok = within_limits(&h, opts.max_memory, opts.max_vcpus)
                    .and_then(|()| acceptable(&h, opts.host.as_ref()))
                    .and_then(|()| opts.devices.resolve(&h.devices));
                outcome = Some(Input::Done(ok.map(|devices| d.devices = Some(devices))));
                d.hello = Some(*h);
            }
            Action::Accept => d.accept()?,
            Action::WritePages => d.write_pages(phase)?,
            Action::Readahead(words) => d.readahead(&words)?,
            Action::Missing { first_page, words } => d.missing(first_page, &words)?,
            Action::Sync => {
                // The end of round 0: later rounds rewrite pages already there.
                d.readahead = None;
                outcome = Some(Input::Done(d.finish_building()));
            }
            Action::LoadState => outcome = Some(Input::Done(d.load_state()?)),
            Action::Start => {
                // Postcopy: missing pages dropped and faults reported before any vCPU runs.
                let ready = d.prepare_postcopy();
                let vm =
                    d.vm.as_ref()
                        .ok_or(Error::Restore("the VM was not built".into()))?;
                let run = ready.and_then(|()| start.take().map_or(Ok(()), |s| s(vm)));
                outcome = Some(Input::Done(run.map_err(|e| {
                    format!("starting the guest (phase: {phase}): {e}; the source keeps it")
                })));
            }
            Action::Running => {
                if let Err(e) = protocol::send(&mut d.conn, &Message::Running) {
                    // The source keeps its copy paused and says the guest may run here.
                    log::warn!("confirming Running to the source (phase: {phase}): {e}");
                }
                handed_over();
                d.postcopy()?;
                return d
                    .vm
                    .take()
                    .ok_or(Error::Restore("the VM was not built".into()));
            }
        }
    }
}

/// The destination's I/O and machine, as the receiver's actions need them.
struct Driver<'c, C: Read + Write> {
    conn: &'c mut C,
    console: Option<Box<dyn std::io::Write + Send>>,
    hello: Option<Hello>,
    /// The disks and taps to build on: this side's, matched to the Hello's devices.
    devices: Option<Backends>,
    /// Guest RAM, filled from round 0 on while the rest of the machine is built.
    mem: Option<crate::memory::GuestMemoryMmap>,
    regions: Vec<(u64, u64)>,
    building: Option<crate::sandbox::Spawning<Result<Vm, crate::vm::Error>>>,
    vm: Option<Vm>,
    /// Round 0 fills fresh RAM: back it ahead of the pages (super::prefault).
    readahead: Option<super::prefault::Prefault>,
    /// The head of the page frame just read.
    pages: Option<migration::pages::FrameHead>,
    /// Postcopy: the pages to fetch once the guest runs.
    missing: Option<super::postcopy::Missing>,
    /// Postcopy, from Start on: guest RAM and the userfaultfd that reports its faults.
    postcopy: Option<(super::postcopy::Ram, super::postcopy::uffd::Uffd)>,
}

impl<C: Read + Write> Driver<'_, C> {
    /// The next input: a control message, or in precopy a page frame's head too.
    fn read(&mut self, rx: &Receiver) -> Result<Input, Error> {
        let phase = rx.phase();
        if !rx.in_precopy() {
            return match protocol::recv(&mut self.conn) {
                Ok(m) => Ok(Input::Message(m)),
                Err(e) if phase == Phase::AwaitCommit => Err(Error::NoCommit(e.to_string())),
                Err(e) => Err(proto(phase, rx.awaits())(e)),
            };
        }
        Ok(
            match protocol::recv_precopy(&mut self.conn).map_err(proto(phase, rx.awaits()))? {
                Precopy::Pages(head) => {
                    let round = head.round;
                    self.pages = Some(head);
                    Input::Pages { round }
                }
                Precopy::Touched(words) => Input::Message(Message::Touched(words)),
                Precopy::Missing { first_page, words } => {
                    Input::Message(Message::Missing { first_page, words })
                }
                Precopy::Cancel(why) => Input::Message(Message::Cancel(why)),
                Precopy::Sync => Input::Message(Message::Sync),
                Precopy::State => Input::Message(Message::State),
            },
        )
    }

    /// Tells the source why, where the machine says to, and names the error as ferry does.
    fn fail(&mut self, f: Failure) -> Error {
        if let Some(reply) = &f.reply {
            let _ = protocol::send(&mut self.conn, reply);
        }
        use migration::receiver::Error as R;
        match f.error {
            R::Refused(r) => Error::RefusedHere(r),
            R::CancelledBySource(r) => Error::CancelledBySource(r),
            R::Unexpected {
                phase,
                expected,
                got,
            } => proto(phase, "receiving")(protocol::Error::Unexpected {
                expected,
                found: got.into(),
            }),
            R::NoCommit(got) => Error::NoCommit(format!("got {got}")),
            R::Failed(why) => Error::Restore(why),
            R::Ended => Error::Restore("the migration has ended".into()),
        }
    }

    /// Allocates guest RAM (an mmap: at once), builds the rest of the machine (KVM,
    /// memslots, vCPUs, CPUID) on another thread while round 0's pages arrive into that
    /// RAM, starts the readahead, and sends Accept.
    fn accept(&mut self) -> Result<(), Error> {
        let h = self
            .hello
            .as_ref()
            .ok_or(Error::Restore("no Hello".into()))?;
        let refuse = |conn: &mut C, e: String| {
            let reason = format!("cannot create the VM here: {e}");
            let _ = protocol::send(conn, &Message::Refuse(reason.clone()));
            Error::RefusedHere(reason)
        };
        let ram = match crate::memory::GuestRam::new(h.memory) {
            Ok(r) => r,
            Err(e) => return Err(refuse(self.conn, e.to_string())),
        };
        let mem = ram.memory().clone();
        self.regions = ram.regions();
        let builder = crate::vm::VmBuilder::new(0, h.vcpus)
            .ram(ram)
            .console(
                self.console
                    .take()
                    .unwrap_or_else(|| Box::new(std::io::sink())),
            )
            .cpu(crate::vm::CpuChoice::Saved {
                profile_json: h.cpu_profile.clone(),
                guest_cpu: h.guest_cpu.clone(),
            })
            .backends(self.devices.take().unwrap_or_default());
        // Not waited for: Accept goes out while the spawner starts the builder.
        self.building = Some(crate::sandbox::spawn_soon("mig-build".into(), move || {
            builder.build(crate::vm::Boot::Restored)
        }));
        self.readahead = Some(super::prefault::Prefault::start(mem.clone()));
        self.mem = Some(mem);
        protocol::send(&mut self.conn, &Message::Accept)
            .map_err(proto(Phase::Handshake, "sending Accept"))?;
        Ok(())
    }

    fn write_pages(&mut self, phase: Phase) -> Result<(), Error> {
        let (Some(head), Some(mem)) = (self.pages.take(), self.mem.as_ref()) else {
            return Err(Error::Restore("pages before the VM's RAM".into()));
        };
        if let Some(r) = &mut self.readahead {
            r.frame(&head.runs);
        }
        receive_pages(mem, &self.regions, head, &mut self.conn, phase)
    }

    /// The Touched map: the blocks round 0 fills, of exactly this RAM's length.
    fn readahead(&mut self, words: &[u64]) -> Result<(), Error> {
        let ram_end = self.regions.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
        let expected = protocol::touched_words(ram_end);
        if words.len() != expected {
            return Err(Error::BadTouchedMap {
                words: words.len(),
                expected,
            });
        }
        if let Some(r) = &mut self.readahead {
            r.touched(words);
        }
        Ok(())
    }

    /// Postcopy: a Missing message's pages, each of which must be guest RAM.
    fn missing(&mut self, first_page: u64, words: &[u64]) -> Result<(), Error> {
        let ram_end = self.regions.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
        let missing = self
            .missing
            .get_or_insert_with(|| super::postcopy::Missing::new(ram_end));
        missing
            .add(first_page, words, &self.regions)
            .map_err(|why| {
                let _ = protocol::send(&mut self.conn, &Message::Failed(why.clone()));
                Error::Restore(why)
            })
    }

    /// Postcopy (the source named missing pages): guest RAM registered with a
    /// userfaultfd and the missing pages dropped, before the guest starts.
    fn prepare_postcopy(&mut self) -> Result<(), String> {
        let Some(missing) = &self.missing else {
            return Ok(());
        };
        let ram = self
            .mem
            .as_ref()
            .and_then(|m| super::postcopy::Ram::new(m, &self.regions))
            .ok_or("postcopy: guest RAM is not as the Hello described")?;
        let uffd = super::postcopy::prepare(&ram, missing)?;
        self.postcopy = Some((ram, uffd));
        Ok(())
    }

    /// Postcopy, the guest running: every missing page fetched. On failure the guest
    /// cannot go on (part of its memory is only at the source): its vCPUs stay blocked on
    /// their faults, the VM is not torn down (that would wait for them), and the caller
    /// ends the process.
    fn postcopy(&mut self) -> Result<(), Error> {
        let (Some((ram, uffd)), Some(missing)) = (self.postcopy.take(), self.missing.take()) else {
            return Ok(());
        };
        let total = missing.total;
        match super::postcopy::fetch(&mut self.conn, uffd, &ram, missing) {
            Ok(stats) => {
                log::info!("postcopy: {total} pages missing at the switch; {stats:?}");
                Ok(())
            }
            Err(e) => {
                std::mem::forget(self.vm.take());
                Err(Error::PostcopyLost(e.to_string()))
            }
        }
    }

    /// The machine, built: needed by the first Sync (the end of round 0) at the latest.
    fn finish_building(&mut self) -> Result<(), String> {
        if let Some(b) = self.building.take() {
            let vm = b
                .handle()
                .map_err(|e| format!("starting the thread that builds the VM: {e}"))?
                .join()
                .map_err(|_| "building the VM panicked".to_string())?
                .map_err(|e| format!("creating the VM: {e}"))?;
            self.vm = Some(vm);
        }
        Ok(())
    }

    /// Reads the VM stream (an I/O failure ends it here) and restores it into the machine
    /// (a failure is the outcome, told to the source).
    fn load_state(&mut self) -> Result<Result<(), String>, Error> {
        self.readahead = None;
        if let Err(e) = self.finish_building() {
            return Ok(Err(e));
        }
        let Some(vm) = self.vm.as_ref() else {
            return Ok(Err("the VM was not built".into()));
        };
        // Memory ranges in the stream (a source sends memory as pages; a stream may still
        // carry some) go into guest RAM as each section arrives, not onto the heap.
        let Some(h) = self.hello.as_ref() else {
            return Ok(Err("no Hello".into()));
        };
        let announced = migration::Announced {
            memory: h.memory,
            vcpus: h.vcpus,
            cpu_profile: &h.cpu_profile,
            devices: h.devices.len(),
        };
        let mut input = BufReader::new(&mut self.conn);
        let read = migration::read_head_as(&mut input, &announced).and_then(|(state, rest)| {
            rest.memory_until_end(|gpa, data| {
                vm.memory()
                    .write_slice(data, GuestAddress(gpa))
                    .map_err(|_| "is not guest RAM")
            })?;
            Ok(state)
        });
        use migration::stream::Error as S;
        let state = match read {
            Ok(state) => state,
            // Not the machine admitted: told to the source, which keeps its guest.
            Err(e @ S::NotAnnounced(_)) => return Ok(Err(e.to_string())),
            Err(e) => {
                let e = match e {
                    S::Io { source, .. } => source,
                    S::Truncated { .. } => std::io::ErrorKind::UnexpectedEof.into(),
                    other => std::io::Error::other(other.to_string()),
                };
                return Err(io(Phase::Switchover, "receiving the VM state")(e));
            }
        };
        let got_state = Instant::now();
        let (Some(h), Some(vm)) = (self.hello.as_ref(), self.vm.as_mut()) else {
            return Ok(Err("the VM was not built".into()));
        };
        // RAM, vCPUs and the CPU profile were compared as the stream came (read_head_as);
        // the devices' backends here.
        let backends: Vec<_> = state.devices.iter().map(|d| d.backend.clone()).collect();
        if backends != h.devices {
            return Ok(Err(
                "the VM state's devices are not the ones the Hello announced".into(),
            ));
        }
        let loaded = vm.restore_state(&state).map_err(|e| e.to_string());
        log::debug!("receive: state loaded in {:?}", got_state.elapsed());
        Ok(loaded)
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
    // Round 0 fills fresh RAM, which reads as zero already: its ZERO runs need nothing.
    let round = head.round;
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
    for run in runs.iter().filter(|r| r.zero && round > 0) {
        discard(mem, run.gpa, run.len()).map_err(|_| Error::PagesOutsideRam {
            gpa: run.gpa,
            len: run.len(),
        })?;
    }
    Ok(())
}

/// Makes `[gpa, gpa + len)` of guest RAM (inside one region: checked by the caller) read as
/// zero by giving its pages back to the kernel (MADV_DONTNEED on private anonymous memory),
/// so that a ZERO run never backs RAM, however much of it the source names.
fn discard(mem: &crate::memory::GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), ()> {
    let host = mem.get_host_address(GuestAddress(gpa)).map_err(|_| ())?;
    // SAFETY: the range lies inside one RAM region's private anonymous mapping (the caller
    // checked every run against the regions), which `mem` keeps mapped; MADV_DONTNEED only
    // drops its pages, which then read as zero. No vCPU of this VM runs yet and nothing
    // holds a reference into these pages.
    let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(())
    }
}
