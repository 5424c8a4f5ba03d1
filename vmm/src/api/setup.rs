//! A `ferry serve` without a VM yet: vm.create keeps a configuration, and vm.boot,
//! vm.restore and vm.receive-migration ask the main thread (which holds root and no system
//! call filter until the VM exists) to make the VM, the same way `ferry run`, `restore` and
//! `receive` do; the answer comes once the VM runs here, or with why it does not. One VM
//! per ferry: once it exists, these routes answer `wrong-state`.
//!
//! ```text
//! api-conn thread: PUT vm.boot -> Setups::ask(Setup::Boot(config)) --channel--> main thread
//!                  <- 204 once main has attached the VM to the server and started it
//! ```

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

use super::create::{ReceiveRequest, RestoreRequest};
use super::routes::{After, SNAPSHOT_IN_DIR};
use super::wire::{self, Answer, Code, Failure, Request, StateAnswer, VmStatus};
use crate::config::VmConfig;

/// What the main thread is asked to make.
#[derive(Debug)]
pub enum Setup {
    Boot(VmConfig),
    Restore {
        path: PathBuf,
        paused: bool,
    },
    Receive(Box<ReceiveRequest>),
    /// vmm.shutdown before there is a VM: this ferry ends.
    Exit,
}

/// The main thread's answer: Ok once the VM runs here (and is attached to the server).
pub type Reply = Sender<Result<(), Failure>>;

/// What a `ferry serve` holds before its VM exists.
#[derive(Debug)]
pub struct Setups {
    to_main: Mutex<Sender<(Setup, Reply)>>,
    /// This host's CPU, for ferry.cpu-check before there is a VM.
    host: cpuid::CpuidDump,
    created: Mutex<Option<VmConfig>>,
    /// One setup at a time.
    busy: Mutex<()>,
}

impl Setups {
    /// The setups of a ferry on `host`, and the main thread's end of their channel.
    pub fn new(host: cpuid::CpuidDump) -> (Setups, Receiver<(Setup, Reply)>) {
        let (tx, rx) = channel();
        let s = Setups {
            to_main: Mutex::new(tx),
            host,
            created: Mutex::new(None),
            busy: Mutex::new(()),
        };
        (s, rx)
    }

    /// Tells the main thread to end (vmm.shutdown without a VM); no answer is awaited.
    pub fn exit(&self) {
        let (reply, _) = channel();
        let _ = self.lock_sender().send((Setup::Exit, reply));
    }

    fn lock_sender(&self) -> std::sync::MutexGuard<'_, Sender<(Setup, Reply)>> {
        self.to_main.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the main thread for `setup` and waits for its answer.
    fn ask(&self, setup: Setup) -> Result<(), Failure> {
        let Ok(_one) = self.busy.try_lock() else {
            let e = "a VM is being made already (vm.boot, vm.restore or vm.receive-migration)";
            return Err(Failure::new(Code::Busy, e));
        };
        let (reply, answer) = channel();
        let gone = || Failure::new(Code::Internal, "the main thread is gone");
        self.lock_sender()
            .send((setup, reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    /// The configuration vm.create kept, taken (vm.delete).
    fn take_created(&self) -> Option<VmConfig> {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The configuration vm.create kept, if any.
    pub fn created(&self) -> Option<VmConfig> {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn fail(code: Code, message: impl Into<String>) -> (Answer, After) {
    (Answer::Failure(Failure::new(code, message)), After::Nothing)
}

fn running() -> (Answer, After) {
    let state = VmStatus::Running;
    (Answer::State(StateAnswer { state }), After::Nothing)
}

/// Answers a request to a ferry that has no VM yet, made by `setups` (none: its VM ended).
pub fn before_vm(req: &Request, setups: Option<&Setups>) -> (Answer, After) {
    let Some(setups) = setups else {
        return fail(Code::WrongState, "this ferry's VM has ended");
    };
    let done = |r: Result<(), Failure>| match r {
        Ok(()) => running(),
        Err(f) => (Answer::Failure(f), After::Nothing),
    };
    match req {
        Request::Shutdown => (
            Answer::State(StateAnswer {
                state: VmStatus::Stopped,
            }),
            After::Exit,
        ),
        Request::Create(c) => {
            let mut created = setups.created.lock().unwrap_or_else(|e| e.into_inner());
            if created.is_some() {
                return fail(
                    Code::WrongState,
                    "a VM was created already: boot it (vm.boot)",
                );
            }
            match c.to_config() {
                Ok(cfg) => {
                    *created = Some(cfg);
                    running()
                }
                Err(e) => fail(Code::BadRequest, format!("vm.create: {e}")),
            }
        }
        Request::Delete => match setups.take_created() {
            Some(_) => running(),
            None => fail(Code::WrongState, "no VM was created"),
        },
        Request::Boot => match setups.created() {
            Some(cfg) => done(setups.ask(Setup::Boot(cfg))),
            None => fail(Code::WrongState, "no VM was created: vm.create first"),
        },
        Request::Restore(r) => match restore_path(r) {
            Ok(path) => done(setups.ask(Setup::Restore {
                path,
                paused: r.paused,
            })),
            Err(e) => fail(Code::BadRequest, e),
        },
        Request::Receive(r) => match r.check() {
            Ok(()) => done(setups.ask(Setup::Receive(r.clone()))),
            Err(e) => fail(Code::BadRequest, format!("vm.receive-migration: {e}")),
        },
        Request::CpuCheck(c) => (
            super::views::cpu_check_answer(&c.profile, &setups.host),
            After::Nothing,
        ),
        Request::Info => match setups.created() {
            Some(cfg) => (Answer::Info(Box::new(created_info(&cfg))), After::Nothing),
            None => fail(Code::WrongState, NO_VM),
        },
        _ => fail(Code::WrongState, NO_VM),
    }
}

/// Why a request that needs the VM fails before there is one.
const NO_VM: &str =
    "there is no VM yet: vm.create and vm.boot, vm.restore or vm.receive-migration make one";

/// The snapshot file a vm.restore names: the file, or ferry.snap in the directory.
fn restore_path(r: &RestoreRequest) -> Result<PathBuf, String> {
    if r.prefault {
        return Err("prefault: ferry maps a snapshot's memory as the guest touches it (send without prefault)".into());
    }
    let path = super::routes::file_url(&r.source_url).map_err(|e| format!("source_url: {e}"))?;
    Ok(match path.is_dir() {
        true => path.join(SNAPSHOT_IN_DIR),
        false => path,
    })
}

/// vm.info of a VM created and not booted.
fn created_info(cfg: &VmConfig) -> wire::VmInfo {
    wire::VmInfo {
        config: wire::VmInfoConfig {
            cpus: wire::CpusConfig {
                boot_vcpus: cfg.vcpus,
                max_vcpus: cfg.vcpus,
            },
            memory: wire::MemoryConfig { size: cfg.memory },
            disks: cfg
                .disks
                .iter()
                .map(|d| wire::DiskConfig {
                    path: d.path.display().to_string(),
                    readonly: d.read_only,
                })
                .collect(),
            net: cfg
                .nets
                .iter()
                .map(|n| wire::NetConfig {
                    tap: n.tap.clone(),
                    mac: n
                        .mac
                        .map_or(String::new(), |m| m.map(|b| format!("{b:02x}")).join(":")),
                })
                .collect(),
            cpu_profile: cfg.cpu.clone().unwrap_or_default(),
        },
        state: "Created".into(),
        memory_actual_size: 0,
    }
}
