//! The destination's I/O and machine behind each of migration::receiver's actions: the
//! Hello's checks, guest RAM and the machine built while round 0 arrives, page frames into
//! RAM, the state loaded, the guest started, postcopy's fetching.

use std::io::{BufReader, Read, Write};
use std::time::{Duration, Instant};

use migration::protocol::{self, Hello, Message, Precopy};
use migration::receiver::{Action, Failure, Input, Receiver};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::virtio::backends::Backends;
use crate::vm::Vm;

use super::admission::{acceptable, within_limits};
use super::{postcopy, prefault, ReceiveOptions};
use crate::migrate::*;

/// The destination's I/O and machine, as the receiver's actions need them.
pub(super) struct Driver<'c, C: Read + Write> {
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
    /// Round 0 fills fresh RAM: back it ahead of the pages (prefault.rs).
    readahead: Option<prefault::Prefault>,
    /// The head of the page frame just read.
    pages: Option<migration::pages::FrameHead>,
    /// Postcopy: the pages to fetch once the guest runs.
    missing: Option<postcopy::Missing>,
    /// Postcopy, from Start on: guest RAM and the userfaultfd that reports its faults.
    postcopy: Option<(postcopy::Ram, postcopy::uffd::Uffd)>,
}

/// What the loop does after an action.
pub(super) enum Step {
    /// Go on, with the outcome the receiver waits for (None: read the next input).
    Go(Option<Input>),
    /// The source has been told Running: the guest is this side's.
    HandedOver,
}

impl<'c, C: Read + Write> Driver<'c, C> {
    pub(super) fn new(conn: &'c mut C, console: Box<dyn std::io::Write + Send>) -> Self {
        Driver {
            conn,
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
        }
    }

    /// Tells the source that this side's deadline passed, and the error to end with.
    pub(super) fn deadline_passed(&mut self, deadline: Duration, phase: Phase) -> Error {
        let why = format!(
            "its deadline of {} s passed (phase: {phase}); the source keeps the guest",
            deadline.as_secs(),
        );
        let _ = protocol::send(&mut self.conn, &Message::Failed(why.clone()));
        Error::Deadline(why)
    }

    /// Carries out one of the receiver's actions.
    pub(super) fn act<S: FnOnce(&Vm) -> Result<(), String>>(
        &mut self,
        action: Action,
        phase: Phase,
        opts: &mut ReceiveOptions,
        start: &mut Option<S>,
    ) -> Result<Step, Error> {
        let done = |r: Result<(), String>| Ok(Step::Go(Some(Input::Done(r))));
        match action {
            Action::Next => {}
            Action::Reply(m) => {
                protocol::send(&mut self.conn, &m).map_err(proto(phase, "answering the source"))?;
            }
            Action::CheckHello(h) => {
                let ok = within_limits(&h, opts.max_memory, opts.max_vcpus)
                    .and_then(|()| acceptable(&h, opts.host.as_ref()))
                    .and_then(|()| opts.devices.resolve(&h.devices));
                self.hello = Some(*h);
                return done(ok.map(|devices| self.devices = Some(devices)));
            }
            Action::Accept => self.accept()?,
            Action::WritePages => self.write_pages(phase)?,
            Action::Readahead(words) => self.readahead(&words)?,
            Action::Missing { first_page, words } => self.missing(first_page, &words)?,
            Action::Sync => {
                // The end of round 0: later rounds rewrite pages already there.
                self.readahead = None;
                return done(self.finish_building());
            }
            Action::LoadState => return done(self.load_state()?),
            Action::Start => return done(self.start(phase, start)),
            Action::Running => {
                if let Err(e) = protocol::send(&mut self.conn, &Message::Running) {
                    // The source keeps its copy paused and says the guest may run here.
                    log::warn!("confirming Running to the source (phase: {phase}): {e}");
                }
                return Ok(Step::HandedOver);
            }
        }
        Ok(Step::Go(None))
    }

    /// Postcopy's missing pages dropped and faults reported before any vCPU runs, then the
    /// guest started.
    fn start<S: FnOnce(&Vm) -> Result<(), String>>(
        &mut self,
        phase: Phase,
        start: &mut Option<S>,
    ) -> Result<(), String> {
        let ready = self.prepare_postcopy();
        let vm = self.vm.as_ref().ok_or("the VM was not built")?;
        let run = ready.and_then(|()| start.take().map_or(Ok(()), |s| s(vm)));
        run.map_err(|e| format!("starting the guest (phase: {phase}): {e}; the source keeps it"))
    }

    /// After Running: postcopy's pages fetched (if any are missing), then the VM.
    pub(super) fn postcopy_then_vm(&mut self) -> Result<Vm, Error> {
        self.postcopy()?;
        self.vm
            .take()
            .ok_or(Error::Restore("the VM was not built".into()))
    }
    /// The next input: a control message, or in precopy a page frame's head too.
    pub(super) fn read(&mut self, rx: &Receiver) -> Result<Input, Error> {
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
    pub(super) fn fail(&mut self, f: Failure) -> Error {
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
        self.readahead = Some(prefault::Prefault::start(mem.clone()));
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
            .get_or_insert_with(|| postcopy::Missing::new(ram_end));
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
            .and_then(|m| postcopy::Ram::new(m, &self.regions))
            .ok_or("postcopy: guest RAM is not as the Hello described")?;
        let uffd = postcopy::prepare(&ram, missing)?;
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
        match postcopy::fetch(&mut self.conn, uffd, &ram, missing) {
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
