//! `ferry run` and `ferry restore`: build or take in a VM, then run it until it ends
//! ([`run_vm`]: control socket, console input, VM events; `ferry receive` and `ferry serve`
//! end the same way).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vmm::api::handlers::Served;
use vmm::config::{parse_size, VmConfig};
use vmm::devices::console::{Console, Input};
use vmm::{api, vm, VmEvent};

use super::args::{RestoreArgs, RunArgs};

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    a.sandbox.apply()?;
    a.monitor.start()?;
    let memory = parse_size(&a.memory).context("--memory")?;
    let Console {
        output: console,
        input,
    } = a.serial.serial.open()?;
    let vmm::devices::virtio::backends::Devices { disks, nets } = a.devices.parse()?;
    let vm = match (a.kernel, a.image) {
        (Some(kernel), _) => {
            let cfg = VmConfig {
                memory,
                vcpus: a.vcpus,
                kernel,
                initrd: a.initrd,
                cmdline: a.cmdline,
                cpu: a.cpu,
                disks,
                nets,
            };
            vm::build(&cfg, console)?
        }
        (None, Some(image)) => {
            let mut b = vm::VmBuilder::new(memory, a.vcpus).console(console);
            if let Some(spec) = &a.cpu {
                b = b.cpu(vm::CpuChoice::Named(spec.clone()));
            }
            for d in disks {
                b = b.disk(d);
            }
            for n in nets {
                b = b.net(n);
            }
            boot_image(b, &image, &a.entry, memory)?
        }
        (None, None) => anyhow::bail!("give --kernel or --image"),
    };
    a.debug.open()?.attach(&vm);
    let api = bind_api(a.api_socket.as_deref())?;
    run_vm(Arc::new(vm), api, Some("booted"), input)
}

/// The control socket of a VM about to run: none, bound and not served yet, or served
/// already (`ferry serve`, whose server has the VM attached).
pub enum Api {
    None,
    Bound(api::ApiListener),
    Serving(api::ApiServer, Arc<Served>),
}

/// Binds the control socket, if one was asked for (served once the VM exists).
pub fn bind_api(path: Option<&std::path::Path>) -> anyhow::Result<Api> {
    Ok(match path {
        Some(p) => Api::Bound(api::ApiServer::bind(p)?),
        None => Api::None,
    })
}

/// A raw machine-code image (tests/tiny): `real` mode at 0x1000, `long64` at 0x10000.
fn boot_image(
    b: vm::VmBuilder,
    image: &std::path::Path,
    entry: &str,
    memory: u64,
) -> anyhow::Result<vmm::Vm> {
    use vmm::boot::{layout::BOOT_STACK_TOP, EntryPoint};
    let bytes = vmm::files::read_capped(image, memory)
        .with_context(|| format!("image {}", image.display()))?;
    let (addr, entry) = match entry {
        "real" => (0x1000, EntryPoint::Real { rip: 0x1000 }),
        _ => (
            0x10000,
            EntryPoint::Long64 {
                rip: 0x10000,
                rsp: BOOT_STACK_TOP,
            },
        ),
    };
    Ok(b.build(vm::Boot::Raw {
        image: &bytes,
        addr,
        entry,
    })?)
}

/// Runs a built (or restored) VM until it ends: control socket (bound already), console
/// input, events. `start`: the event that says the VM started, if it is to start here.
pub fn run_vm(
    vm: Arc<vmm::Vm>,
    api: Api,
    start: Option<&str>,
    input: Option<Input>,
) -> anyhow::Result<ExitCode> {
    // Everything that needs root is open: become --user (a restore or a destination
    // already has).
    if let Api::Bound(l) = &api {
        vmm::sandbox::hand_over(l.path())?;
    }
    vmm::sandbox::drop_privileges()?;
    let (served, _api) = match api {
        Api::Bound(l) => {
            let served = Arc::new(Served::new(vm.clone()));
            (served.clone(), Some(l.serve_with(served)?))
        }
        Api::Serving(server, served) => (served, Some(server)),
        Api::None => (Arc::new(Served::new(vm.clone())), None),
    };
    // SIGTERM and SIGINT stop this VM in order from now on.
    vmm::signals::watch(served);
    vmm::timeline::mark("control socket");
    if let Some(input) = input {
        console_input(vm.clone(), input)?;
    }
    if let Some(event) = start {
        vm.start()?;
        vmm::monitor::emit("vm", event, None);
        vmm::timeline::mark("started");
    }
    vmm::sandbox::enter(vmm::sandbox::Kind::Main)?;
    let event = loop {
        if let Some(e) = vm.next_event(Duration::from_secs(1)) {
            break e;
        }
    };
    vm.shutdown();
    ended(event)
}

/// Feeds the console's input to the guest's serial port, on a thread of its own.
fn console_input(vm: Arc<vmm::Vm>, input: Input) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            vmm::sandbox::enter_or_exit(vmm::sandbox::Kind::Stdin);
            input.run(&mut |mut rest| {
                while !rest.is_empty() {
                    let took = vm.serial_input(rest);
                    rest = &rest[took..];
                    if took == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            });
        })
        .context("starting the console input thread")?;
    Ok(())
}

/// How the VM ended: its events, a line for people, and the exit status.
fn ended(event: VmEvent) -> anyhow::Result<ExitCode> {
    let reason = match &event {
        VmEvent::Reset { .. } => "reset",
        VmEvent::Poweroff => "poweroff",
        VmEvent::StopRequested { .. } => "stop-requested",
        VmEvent::GuestFailure { .. } => "guest-failure",
    };
    let reason = serde_json::json!({ "reason": reason });
    vmm::monitor::emit("vm", "shutdown", Some(reason));
    vmm::monitor::emit("vmm", "shutdown", None);
    match event {
        VmEvent::Reset { source } => {
            eprintln!("ferry: guest reset ({source}); VM ended");
            Ok(ExitCode::SUCCESS)
        }
        VmEvent::Poweroff => {
            eprintln!("ferry: guest powered off; VM ended");
            Ok(ExitCode::SUCCESS)
        }
        VmEvent::StopRequested { by } => {
            eprintln!("ferry: stopped by {by}; VM ended");
            Ok(ExitCode::SUCCESS)
        }
        VmEvent::GuestFailure { vcpu, reason, rip } => {
            anyhow::bail!("guest failed: vcpu{vcpu}: {reason} at rip {rip:#x}")
        }
    }
}

/// `ferry restore`: what needs root is opened first (the snapshot file, the disks and taps
/// the command line names, the control socket, /dev/kvm with --user); then ferry becomes
/// --user and enters its filter, and only then reads the file.
pub fn restore(a: RestoreArgs) -> anyhow::Result<ExitCode> {
    a.sandbox.apply()?;
    a.monitor.start()?;
    let what = || format!("restoring snapshot {}", a.file.display());
    let file = std::fs::File::open(&a.file).with_context(what)?;
    let mut devices = a.devices.parse()?.open()?;
    let Console {
        output: console,
        input,
    } = a.serial.serial.open()?;
    let debug = a.debug.open()?;
    vmm::vm::keep_kvm_open()?;
    let api = bind_api(a.api_socket.as_deref())?;
    if let Api::Bound(l) = &api {
        vmm::sandbox::hand_over(l.path())?;
    }
    vmm::sandbox::drop_privileges()?;
    vmm::sandbox::enter(vmm::sandbox::Kind::Loader)?;
    let vm = vmm::snapshot::restore_from(file, &mut devices, console).with_context(what)?;
    debug.attach(&vm);
    run_vm(Arc::new(vm), api, (!a.paused).then_some("restored"), input)
}
