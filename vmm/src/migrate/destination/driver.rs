//! The destination's I/O and machine behind each of migration::receiver's actions: the
//! Hello's checks, guest RAM and the machine built while round 0 arrives, page frames into
//! RAM, the state loaded, the guest started, postcopy's fetching. What it holds grows stage
//! by stage ([`Held`]), as the receiver's states allow.

use std::io::{BufReader, Read, Write};
use std::time::{Duration, Instant};

use migration::protocol::{self, Hello, Message, Precopy};
use migration::receiver::{Action, Failure, Input, Receiver};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::backends::Backends;
use crate::vm::Vm;

use super::admission::{acceptable, within_limits};
use super::error::ReceiveError as Here;
use super::frames::receive_pages;
use super::{postcopy, prefault, ReceiveOptions};
use crate::migrate::*;

type Console = Box<dyn std::io::Write + Send>;

/// What the destination holds, as far as the migration has come.
enum Held {
    /// Until a Hello is taken: the console the machine will write to.
    Waiting(Console),
    /// The Hello checked and taken, its devices matched to this side's.
    Checked {
        hello: Box<Hello>,
        devices: Backends,
        console: Console,
    },
    /// From Accept on: the guest's RAM and its machine.
    Guest(Box<Guest>),
    /// Nothing: moved on, or refused.
    Gone,
}

/// The guest taken in: RAM from Accept on, the machine built meanwhile.
struct Guest {
    hello: Box<Hello>,
    mem: crate::memory::GuestMemoryMmap,
    regions: Vec<(u64, u64)>,
    machine: Machine,
    /// Round 0 fills fresh RAM: backed ahead of the pages (prefault.rs) until the first
    /// Sync.
    readahead: Option<prefault::Prefault>,
    postcopy: Postcopy,
}

/// The machine: being built on another thread while round 0 arrives, then built (or lost
/// to a failed build). It lives in the boxed [`Guest`], once per migration.
#[allow(clippy::large_enum_variant)]
enum Machine {
    Building(crate::sandbox::Spawning<Result<Vm, crate::vm::Error>>),
    Built(Vm),
    Lost,
}

/// Postcopy's pages: none, those the source named missing, and from Start on those with
/// guest RAM registered with the userfaultfd that reports their faults.
enum Postcopy {
    Off,
    Named(postcopy::Missing),
    Armed {
        missing: postcopy::Missing,
        ram: postcopy::Ram,
        uffd: postcopy::uffd::Uffd,
    },
}

/// The destination's I/O and what it holds, as the receiver's actions need them.
pub(super) struct Driver<'c, C: Read + Write> {
    conn: &'c mut C,
    held: Held,
    /// The head of the page frame just read (WritePages reads its pages).
    pages: Option<migration::pages::FrameHead>,
}

/// What the loop does after an action.
pub(super) enum Step {
    /// Go on, with the outcome the receiver waits for (None: read the next input).
    Go(Option<Input<Here>>),
    /// The source has been told Running: the guest is this side's.
    HandedOver,
}

impl Guest {
    fn ram_end(&self) -> u64 {
        self.regions.iter().map(|&(s, l)| s + l).max().unwrap_or(0)
    }

    /// The machine, built: needed by the first Sync (the end of round 0) at the latest.
    fn finish_building(&mut self) -> Result<&mut Vm, Here> {
        // Lost until the build is in: a failed build leaves no machine behind.
        self.machine = match std::mem::replace(&mut self.machine, Machine::Lost) {
            Machine::Building(b) => Machine::Built(
                b.handle()
                    .map_err(Here::BuildThread)?
                    .join()
                    .map_err(|_| Here::BuildPanicked)?
                    .map_err(Here::Machine)?,
            ),
            other => other,
        };
        match &mut self.machine {
            Machine::Built(vm) => Ok(vm),
            _ => Err(Here::OutOfTurn("the machine")),
        }
    }

    /// Postcopy (the source named missing pages): guest RAM registered with a
    /// userfaultfd and the missing pages dropped, before the guest starts.
    fn arm_postcopy(&mut self) -> Result<(), Here> {
        let Postcopy::Named(missing) = std::mem::replace(&mut self.postcopy, Postcopy::Off) else {
            return Ok(());
        };
        let ram = postcopy::Ram::new(&self.mem, &self.regions)
            .ok_or(Here::OutOfTurn("guest RAM as the Hello described"))?;
        let uffd = postcopy::prepare(&ram, &missing)?;
        self.postcopy = Postcopy::Armed { missing, ram, uffd };
        Ok(())
    }
}

impl<'c, C: Read + Write> Driver<'c, C> {
    pub(super) fn new(conn: &'c mut C, console: Console) -> Self {
        Driver {
            conn,
            held: Held::Waiting(console),
            pages: None,
        }
    }

    fn guest(&mut self, what: &'static str) -> Result<&mut Guest, Here> {
        match &mut self.held {
            Held::Guest(g) => Ok(g),
            _ => Err(Here::OutOfTurn(what)),
        }
    }

    /// Tells the source that this side's deadline passed, and the error to end with.
    pub(super) fn deadline_passed(&mut self, deadline: Duration, phase: Phase) -> Error {
        let why = crate::migrate::error::deadline_passed(deadline, phase);
        let _ = protocol::send(&mut self.conn, &Message::Failed(why));
        Error::Deadline { deadline, phase }
    }

    /// Carries out one of the receiver's actions.
    pub(super) fn act<S: FnOnce(&Vm) -> Result<(), crate::vm::Error>>(
        &mut self,
        action: Action,
        phase: Phase,
        opts: &mut ReceiveOptions,
        start: &mut Option<S>,
    ) -> Result<Step, Error> {
        let done = |r: Result<(), Here>| Ok(Step::Go(Some(Input::Done(r))));
        match action {
            Action::Next => {}
            Action::Reply(m) => {
                protocol::send(&mut self.conn, &m).map_err(proto(phase, "answering the source"))?;
            }
            Action::CheckHello(hello) => return done(self.check(hello, opts)),
            Action::Accept => self.accept()?,
            Action::WritePages => self.write_pages(phase)?,
            Action::Readahead(words) => self.readahead(&words)?,
            Action::Missing { first_page, words } => self.missing(first_page, &words)?,
            Action::Sync => {
                // The end of round 0: later rounds rewrite pages already there.
                let built = self.guest("Sync").and_then(|g| {
                    g.readahead = None;
                    g.finish_building().map(|_| ())
                });
                return done(built);
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

    /// The Hello against this side's limits, this host and this side's devices.
    fn check(&mut self, hello: Box<Hello>, opts: &mut ReceiveOptions) -> Result<(), Here> {
        within_limits(&hello, opts.max_memory, opts.max_vcpus)?;
        acceptable(&hello, opts.host.as_ref())?;
        let devices = opts.devices.resolve(&hello.devices)?;
        let Held::Waiting(console) = std::mem::replace(&mut self.held, Held::Gone) else {
            return Err(Here::OutOfTurn("a second Hello"));
        };
        self.held = Held::Checked {
            hello,
            devices,
            console,
        };
        Ok(())
    }

    /// Postcopy's missing pages dropped and faults reported before any vCPU runs, then the
    /// guest started.
    fn start<S: FnOnce(&Vm) -> Result<(), crate::vm::Error>>(
        &mut self,
        phase: Phase,
        start: &mut Option<S>,
    ) -> Result<(), Here> {
        let g = self.guest("Start")?;
        g.arm_postcopy()?;
        let vm = g.finish_building()?;
        match start.take() {
            Some(s) => s(vm).map_err(|source| Here::Start { phase, source }),
            None => Ok(()),
        }
    }

    /// After Running: postcopy's pages fetched (if any are missing), then the VM.
    pub(super) fn postcopy_then_vm(&mut self) -> Result<Vm, Error> {
        let here = |e: Here| Error::FailedHere(Box::new(e));
        let Held::Guest(g) = std::mem::replace(&mut self.held, Held::Gone) else {
            return Err(here(Here::OutOfTurn("Running")));
        };
        let Guest {
            machine, postcopy, ..
        } = *g;
        let Machine::Built(vm) = machine else {
            return Err(here(Here::OutOfTurn("Running")));
        };
        let Postcopy::Armed { missing, ram, uffd } = postcopy else {
            return Ok(vm);
        };
        // On failure the guest cannot go on (part of its memory is only at the source): its
        // vCPUs stay blocked on their faults, the VM is not torn down (that would wait for
        // them), and the caller ends the process.
        let total = missing.total;
        match postcopy::fetch(&mut self.conn, uffd, &ram, missing) {
            Ok(stats) => {
                log::info!("postcopy: {total} pages missing at the switch; {stats:?}");
                Ok(vm)
            }
            Err(e) => {
                std::mem::forget(vm);
                Err(Error::PostcopyLost(Box::new(e)))
            }
        }
    }

    /// The next input: a control message, or in precopy a page frame's head too.
    pub(super) fn read(&mut self, rx: &Receiver) -> Result<Input<Here>, Error> {
        let phase = rx.phase();
        if !rx.in_precopy() {
            return match protocol::recv(&mut self.conn) {
                Ok(m) => Ok(Input::Message(m)),
                Err(e) if phase == Phase::AwaitCommit => Err(Error::NoCommit(e)),
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
    pub(super) fn fail(&mut self, f: Failure<Here>) -> Error {
        if let Some(reply) = &f.reply {
            let _ = protocol::send(&mut self.conn, reply);
        }
        use migration::receiver::Error as R;
        match f.error {
            R::Refused(e) => Error::RefusedHere(Box::new(e)),
            R::NoKey => Error::RefusedHere(Box::new(Here::NoKey)),
            R::CancelledBySource(r) => Error::CancelledBySource(r),
            R::Unexpected {
                phase,
                expected,
                got,
            } => proto(phase, "receiving")(protocol::Error::Unexpected {
                expected,
                found: got.into(),
            }),
            R::NoCommit(got) => Error::NoCommit(protocol::Error::Unexpected {
                expected: "Commit",
                found: got.into(),
            }),
            R::Failed(e) => Error::FailedHere(Box::new(e)),
            R::Ended => Error::FailedHere(Box::new(Here::OutOfTurn("a step after the end"))),
        }
    }

    /// Allocates guest RAM (an mmap: at once), builds the rest of the machine (KVM,
    /// memslots, vCPUs, CPUID) on another thread while round 0's pages arrive into that
    /// RAM, starts the readahead, and sends Accept.
    fn accept(&mut self) -> Result<(), Error> {
        let Held::Checked {
            hello,
            devices,
            console,
        } = std::mem::replace(&mut self.held, Held::Gone)
        else {
            return Err(Error::FailedHere(Box::new(Here::OutOfTurn("Accept"))));
        };
        let ram = match crate::memory::GuestRam::new(hello.memory) {
            Ok(r) => r,
            Err(e) => {
                let e = Here::Machine(e.into());
                let _ = protocol::send(self.conn, &Message::Refuse(e.to_string()));
                return Err(Error::RefusedHere(Box::new(e)));
            }
        };
        let mem = ram.memory().clone();
        let regions = ram.regions();
        let builder = crate::vm::VmBuilder::new(0, hello.vcpus)
            .ram(ram)
            .console(console)
            .cpu(crate::vm::CpuChoice::Saved {
                profile_json: hello.cpu_profile.clone(),
                guest_cpu: hello.guest_cpu.clone(),
            })
            .backends(devices);
        // Not waited for: Accept goes out while the spawner starts the builder.
        let building = crate::sandbox::spawn_soon("mig-build".into(), move || {
            builder.build(crate::vm::Boot::Restored)
        });
        self.held = Held::Guest(Box::new(Guest {
            hello,
            readahead: Some(prefault::Prefault::start(mem.clone())),
            mem,
            regions,
            machine: Machine::Building(building),
            postcopy: Postcopy::Off,
        }));
        protocol::send(&mut self.conn, &Message::Accept)
            .map_err(proto(Phase::Handshake, "sending Accept"))?;
        Ok(())
    }

    fn write_pages(&mut self, phase: Phase) -> Result<(), Error> {
        let (Held::Guest(g), Some(head)) = (&mut self.held, self.pages.take()) else {
            return Err(Error::FailedHere(Box::new(Here::OutOfTurn("pages"))));
        };
        if let Some(r) = &mut g.readahead {
            r.frame(&head.runs);
        }
        receive_pages(&g.mem, &g.regions, head, &mut self.conn, phase)
    }

    /// The Touched map: the blocks round 0 fills, of exactly this RAM's length.
    fn readahead(&mut self, words: &[u64]) -> Result<(), Error> {
        let g = self
            .guest("Touched")
            .map_err(|e| Error::FailedHere(Box::new(e)))?;
        let expected = protocol::touched_words(g.ram_end());
        if words.len() != expected {
            return Err(Error::BadTouchedMap {
                words: words.len(),
                expected,
            });
        }
        if let Some(r) = &mut g.readahead {
            r.touched(words);
        }
        Ok(())
    }

    /// Postcopy: a Missing message's pages, each of which must be guest RAM.
    fn missing(&mut self, first_page: u64, words: &[u64]) -> Result<(), Error> {
        let added = self.guest("Missing").and_then(|g| {
            if let Postcopy::Off = g.postcopy {
                g.postcopy = Postcopy::Named(postcopy::Missing::new(g.ram_end()));
            }
            let Postcopy::Named(missing) = &mut g.postcopy else {
                return Err(Here::OutOfTurn("Missing"));
            };
            missing
                .add(first_page, words, &g.regions)
                .map_err(Here::MissingOutsideRam)
        });
        added.map_err(|e| {
            let _ = protocol::send(&mut self.conn, &Message::Failed(e.to_string()));
            Error::FailedHere(Box::new(e))
        })
    }

    /// Reads the VM stream (an I/O failure ends it here) and restores it into the machine
    /// (a failure is the outcome, told to the source).
    fn load_state(&mut self) -> Result<Result<(), Here>, Error> {
        let Held::Guest(g) = &mut self.held else {
            return Ok(Err(Here::OutOfTurn("the VM state")));
        };
        g.readahead = None;
        if let Err(e) = g.finish_building() {
            return Ok(Err(e));
        }
        let Guest { hello, machine, .. } = &mut **g;
        let Machine::Built(vm) = machine else {
            return Ok(Err(Here::OutOfTurn("the VM state")));
        };
        let state = match read_state(&mut self.conn, hello, vm)? {
            Ok(state) => state,
            Err(e) => return Ok(Err(e)),
        };
        let got_state = Instant::now();
        // RAM, vCPUs and the CPU profile were compared as the stream came (read_head_as);
        // the devices' backends here.
        let backends: Vec<_> = state.devices.iter().map(|d| d.backend.clone()).collect();
        if backends != hello.devices {
            return Ok(Err(Here::DevicesDiffer));
        }
        let loaded = vm.restore_state(&state).map_err(Here::State);
        log::debug!("receive: state loaded in {:?}", got_state.elapsed());
        Ok(loaded)
    }
}

/// Reads the VM stream: Err if the connection failed, Ok(Err) if the stream is not the
/// machine the Hello announced (told to the source, which keeps its guest). Memory ranges
/// in the stream (a source sends memory as pages; a stream may still carry some) go into
/// guest RAM as each section arrives, not onto the heap.
fn read_state(
    conn: &mut impl Read,
    h: &Hello,
    vm: &Vm,
) -> Result<Result<migration::VmState, Here>, Error> {
    let announced = migration::Announced {
        memory: h.memory,
        vcpus: h.vcpus,
        cpu_profile: &h.cpu_profile,
        devices: h.devices.len(),
    };
    let mut input = BufReader::new(conn);
    let read = migration::read_head_as(&mut input, &announced).and_then(|(state, rest)| {
        rest.memory_until_end(|gpa, data| {
            vm.memory()
                .write_slice(data, GuestAddress(gpa))
                .map_err(|_| "is not guest RAM")
        })?;
        Ok(state)
    });
    use migration::stream::Error as S;
    match read {
        Ok(state) => Ok(Ok(state)),
        Err(e @ (S::NotAnnounced { .. } | S::ProfileNotAnnounced)) => {
            Ok(Err(Here::NotAnnounced(e)))
        }
        Err(e) => {
            let e = match e {
                S::Io { source, .. } => source,
                S::Truncated { .. } => std::io::ErrorKind::UnexpectedEof.into(),
                other => std::io::Error::other(other.to_string()),
            };
            Err(io(Phase::Switchover, "receiving the VM state")(e))
        }
    }
}

#[cfg(test)]
mod tests;
