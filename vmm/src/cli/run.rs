//! `ferry run`, `ferry restore` and `ferry receive`: build or take in a VM, then run it until
//! it ends (control socket, console input, VM events).

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vmm::config::{parse_size, VmConfig};
use vmm::devices::serial::FlushingWriter;
use vmm::{api, vm, VmEvent};

use super::args::{read_key, ReceiveArgs, RestoreArgs, RunArgs};

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    a.sandbox.apply()?;
    a.monitor.start()?;
    let memory = parse_size(&a.memory).context("--memory")?;
    let console = Box::new(FlushingWriter(std::io::stdout()));
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
    serve(vm, api, Some("booted"))
}

/// Binds the control socket, if one was asked for (served once the VM exists).
fn bind_api(path: Option<&std::path::Path>) -> anyhow::Result<Option<api::ApiListener>> {
    Ok(match path {
        Some(p) => Some(api::ApiServer::bind(p)?),
        None => None,
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
fn serve(
    vm: vmm::Vm,
    api: Option<api::ApiListener>,
    start: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let vm = Arc::new(vm);
    // Everything that needs root is open: become --user (a restore or a destination
    // already has).
    if let Some(l) = &api {
        vmm::sandbox::hand_over(l.path())?;
    }
    vmm::sandbox::drop_privileges()?;
    let _api = match api {
        Some(l) => Some(l.serve(vm.clone())?),
        None => None,
    };
    vmm::timeline::mark("control socket");
    console_input(vm.clone())?;
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

/// Feeds this terminal's input to the guest's serial port, on a thread of its own.
fn console_input(vm: Arc<vmm::Vm>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            vmm::sandbox::enter_or_exit(vmm::sandbox::Kind::Stdin);
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n @ 1..) = stdin.read(&mut buf) {
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let took = vm.serial_input(rest);
                    rest = &rest[took..];
                    if took == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
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
    let debug = a.debug.open()?;
    vmm::vm::keep_kvm_open()?;
    let api = bind_api(a.api_socket.as_deref())?;
    if let Some(l) = &api {
        vmm::sandbox::hand_over(l.path())?;
    }
    vmm::sandbox::drop_privileges()?;
    vmm::sandbox::enter(vmm::sandbox::Kind::Loader)?;
    let console = Box::new(FlushingWriter(std::io::stdout()));
    let vm = vmm::snapshot::restore_from(file, &mut devices, console).with_context(what)?;
    debug.attach(&vm);
    serve(vm, api, (!a.paused).then_some("restored"))
}

/// What `ferry receive` was asked for: where it listens and how it takes a VM (the disks
/// and taps given opened).
fn receive_options(
    a: &ReceiveArgs,
) -> anyhow::Result<(vmm::migrate::Address, vmm::migrate::ReceiveOptions)> {
    let addr: vmm::migrate::Address = a.listen.parse()?;
    let host = match &a.host {
        Some(p) => Some(cpuid::dump::load(p).with_context(|| format!("--host {}", p.display()))?),
        None => None,
    };
    let key = a.key_file.as_deref().map(read_key).transpose()?;
    let tls = a
        .tls_dir
        .as_deref()
        .map(|d| vmm::migrate::DestinationTls::load(d)?.allow(a.tls_allow.clone()))
        .transpose()?;
    if key.is_none() && tls.is_none() {
        vmm::migrate::check_local(&addr)?;
    }
    anyhow::ensure!(
        !a.peer_timeout.is_zero(),
        "--peer-timeout must be more than 0"
    );
    let opts = vmm::migrate::ReceiveOptions {
        host,
        key,
        tls,
        deadline: a.deadline,
        peer_timeout: a.peer_timeout,
        devices: a.devices.parse()?.open()?,
        max_memory: match &a.max_memory {
            Some(m) => parse_size(m).context("--max-memory")?,
            None => vmm::migrate::host_memory_limit(),
        },
        max_vcpus: a.max_vcpus.unwrap_or_else(vmm::migrate::host_vcpu_limit),
    };
    Ok((addr, opts))
}

/// `ferry receive`: what needs root is opened first (the listener, the disks and taps
/// given, /dev/kvm, the debug console); then ferry becomes --user and enters its filter
/// (the destination's), takes the first source that authenticates (each handshake on a
/// thread filtered as one), and receives its VM on a thread filtered as the receiver,
/// which parses the source's stream and starts no thread itself (the spawner does).
pub fn receive(a: ReceiveArgs) -> anyhow::Result<ExitCode> {
    a.sandbox.apply()?;
    a.monitor.start()?;
    // Postcopy needs a userfaultfd that reports the kernel's faults too (KVM's), which
    // only a privileged process may open: opened now, before --user drops privileges.
    if a.sandbox.user.is_some() {
        if let Err(e) = vmm::migrate::keep_userfaultfd_open() {
            log::warn!("postcopy will be refused: {e}");
        }
    }
    let (addr, opts) = receive_options(&a)?;
    if opts.key.is_some() || opts.tls.is_some() {
        // The TLS library's first use costs milliseconds: not a source's.
        vmm::migrate::warm_up_tls();
    }
    let debug = a.debug.open()?;
    vmm::vm::keep_kvm_open()?;
    let listener = vmm::migrate::Listener::bind(&addr)?;
    if let vmm::migrate::Address::Unix(path) = &addr {
        vmm::sandbox::hand_over(path)?;
    }
    vmm::sandbox::drop_privileges()?;
    vmm::sandbox::enter(vmm::sandbox::Kind::Launcher)?;
    vmm::sandbox::start_spawner().context("starting the spawner thread")?;
    say_waiting(&a.listen, &opts);
    vmm::monitor::emit("vm", "migration-receive-ready", None);
    let source = vmm::migrate::accept_source(listener, &opts)?;
    vmm::monitor::emit("vm", "migration-receive-started", None);
    // Run the guest as soon as the source commits: the control socket and the rest follow.
    let mut commit_to_run = Duration::ZERO;
    let received = std::thread::scope(|s| {
        let receiving = std::thread::Builder::new()
            .name("mig-receive".into())
            .spawn_scoped(s, || {
                vmm::sandbox::enter_or_exit(vmm::sandbox::Kind::Receiver);
                let console = Box::new(FlushingWriter(std::io::stdout()));
                vmm::migrate::receive_source(source, opts, console, |vm| {
                    let committed = std::time::Instant::now();
                    debug.attach(vm);
                    vm.start()?;
                    commit_to_run = committed.elapsed();
                    vmm::monitor::emit("vm", "migration-receive-finished", None);
                    Ok(())
                })
            })
            .context("starting the receiving thread")?;
        receiving
            .join()
            .map_err(|_| anyhow::anyhow!("the receiving thread panicked"))
    })?;
    let vm = received.inspect_err(|e| {
        let failed = serde_json::json!({ "message": e.to_string() });
        vmm::monitor::emit("vm", "migration-receive-failed", Some(failed));
    })?;
    eprintln!(
        "ferry: received the VM ({} MiB, {} vCPUs, CPU profile {}); running it ({:.1} ms after Commit)",
        vm.memory_size() >> 20,
        vm.num_vcpus(),
        vm.cpu_profile().name,
        commit_to_run.as_secs_f64() * 1e3
    );
    let api = bind_api(a.api_socket.as_deref())?;
    serve(vm, api, None)
}

/// The line that says a destination waits, and whom it takes.
fn say_waiting(listen: &str, opts: &vmm::migrate::ReceiveOptions) {
    eprintln!(
        "ferry: waiting for a VM on {listen} ({})",
        match (opts.key.is_some(), opts.tls.is_some()) {
            (true, true) => "TLS: the source needs a certificate of the CA and the shared key",
            (false, true) => "TLS: the source needs a certificate of the CA",
            (true, false) => "TLS: the source must prove the shared key",
            (false, false) => "no key: local connections only, unencrypted",
        }
    );
}
