//! `ferry serve`: a VMM with no VM yet, whose control socket makes one (vm.create and
//! vm.boot, vm.restore, vm.receive-migration: vmm::api::setup), the same way `ferry run`,
//! `restore` and `receive` do; once it runs, it is served and ends as theirs do. One VM per
//! process: when it ends (or migrates away), ferry exits.
//!
//! ```text
//! main: bind + serve the socket -> wait for a Setup -> make the VM (root, unfiltered; a
//!       restore or a receive on a thread filtered as theirs) -> attach it -> start ->
//!       answer -> run_vm (console input, events, the end)
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use vmm::api::setup::{Setup, Setups};
use vmm::api::wire::{Code, Failure};
use vmm::api::{self, handlers::Served};
use vmm::devices::console::Console;
use vmm::devices::serial::SharedWriter;

use super::args::ServeArgs;
use super::receive::{receive_vm, ReceiveSpec};
use super::run::{run_vm, Api};

pub fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        a.sandbox.user.is_none(),
        "ferry serve --user: not supported (the disks, taps and files of the VM are opened when the API asks for it, after ferry would have given up root): run ferry serve as the user it should be"
    );
    a.sandbox.apply()?;
    a.monitor.start()?;
    // The serial console of whichever VM this serve makes (a failed attempt gives it back).
    let Console { output, input } = a.serial.serial.open()?;
    let console = SharedWriter::new(output);
    // This host's CPU, for ferry.cpu-check before there is a VM (KVM is not opened by the
    // control socket's filtered threads).
    let host = vmm::guest_cpu::model::host_dump(&vmm::vm::open_kvm()?)?;
    let (setups, asked) = Setups::new(host);
    let served = Arc::new(Served::waiting(Some(setups)));
    let server = api::ApiServer::bind(&a.api_socket)?.serve_with(served.clone())?;
    eprintln!(
        "ferry: serving {} with no VM yet (vm.create and vm.boot, vm.restore or vm.receive-migration)",
        a.api_socket.display()
    );
    loop {
        let (setup, reply) = asked.recv().context("the control socket's server ended")?;
        let made = match setup {
            Setup::Exit => {
                vmm::monitor::emit("vmm", "shutdown", None);
                eprintln!("ferry: shut down by the control socket, with no VM");
                return Ok(ExitCode::SUCCESS);
            }
            Setup::Boot(cfg) => boot(&cfg, &a, &console).map(|vm| (vm, Some("booted"))),
            Setup::Restore { path, paused } => {
                restore(path, &a, &console).map(|vm| (vm, (!paused).then_some("restored")))
            }
            Setup::Receive(r) => {
                let spec = ReceiveSpec::from_request(&r);
                receive(&spec, &a, &console).map(|vm| (vm, None))
            }
        };
        let (vm, start) = match made {
            Ok(made) => made,
            Err(e) => {
                let _ = reply.send(Err(failure(&e)));
                continue;
            }
        };
        let vm = Arc::new(vm);
        if served.attach(vm.clone()).is_err() {
            anyhow::bail!("a second VM for one ferry serve");
        }
        if let Some(event) = start {
            if let Err(e) = vm.start() {
                let _ = reply.send(Err(Failure::new(e.code(), e.to_string())));
                return Err(e.into());
            }
            vmm::monitor::emit("vm", event, None);
        }
        let _ = reply.send(Ok(()));
        return run_vm(vm, Api::Serving(server, served), None, input);
    }
}

fn boot(
    cfg: &vmm::config::VmConfig,
    a: &ServeArgs,
    console: &SharedWriter,
) -> anyhow::Result<vmm::Vm> {
    let vm = vmm::vm::build(cfg, Box::new(console.clone()))?;
    a.debug.open()?.attach(&vm);
    Ok(vm)
}

/// A restore on a thread of its own under the loader's filter, as `ferry restore`'s main
/// thread does it (this main thread stays able to make another VM if it fails).
fn restore(path: PathBuf, a: &ServeArgs, console: &SharedWriter) -> anyhow::Result<vmm::Vm> {
    let what = || format!("restoring snapshot {}", path.display());
    let file = std::fs::File::open(&path).with_context(what)?;
    let debug = a.debug.open()?;
    let mut devices = vmm::devices::virtio::backends::Devices::default().open()?;
    vmm::vm::keep_kvm_open()?;
    let console = Box::new(console.clone());
    let restored = std::thread::Builder::new()
        .name("restore".into())
        .spawn(move || {
            vmm::sandbox::enter(vmm::sandbox::Kind::Loader)?;
            Ok::<_, anyhow::Error>(vmm::snapshot::restore_from(file, &mut devices, console)?)
        })
        .context("starting the restore thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the restore thread panicked"))?;
    let vm = restored.with_context(what)?;
    debug.attach(&vm);
    Ok(vm)
}

/// A receive on a thread of its own, as `ferry receive`'s main thread does it.
fn receive(spec: &ReceiveSpec, a: &ServeArgs, console: &SharedWriter) -> anyhow::Result<vmm::Vm> {
    let debug = a.debug.open()?;
    let console = Box::new(console.clone());
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("receive".into())
            .spawn_scoped(s, || receive_vm(spec, debug, console))
            .context("starting the receive thread")?
            .join()
            .map_err(|_| anyhow::anyhow!("the receive thread panicked"))?
    })
}

/// The API's failure for an error making the VM: its kind where its type says one.
fn failure(e: &anyhow::Error) -> Failure {
    let code = if let Some(e) = e.downcast_ref::<vmm::vm::Error>() {
        e.code()
    } else if let Some(e) = e.downcast_ref::<vmm::snapshot::FileError>() {
        e.code()
    } else if let Some(e) = e.downcast_ref::<vmm::migrate::Error>() {
        e.code()
    } else if let Some(e) = e.downcast_ref::<vmm::migrate::ReceiveError>() {
        e.code()
    } else if e.downcast_ref::<std::io::Error>().is_some()
        || e.downcast_ref::<vmm::devices::virtio::backends::OpenError>()
            .is_some()
    {
        Code::Io
    } else if e.downcast_ref::<vmm::config::Error>().is_some() {
        Code::BadRequest
    } else {
        Code::Internal
    };
    Failure::new(code, super::one_line(e))
}
