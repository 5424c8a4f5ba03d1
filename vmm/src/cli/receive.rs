//! `ferry receive`, and a `ferry serve`'s vm.receive-migration: wait for one VM from a
//! migrating ferry, check it, restore it and run it ([`receive_vm`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vmm::config::parse_size;
use vmm::devices::virtio::backends::Devices;

use super::args::{read_key, DebugConsole, ReceiveArgs};
use super::run::{bind_api, run_vm};

/// What a destination is asked for: where it listens, whom it takes, its limits, and the
/// disks and taps the guest's devices go on (none: the ones it was saved with).
#[derive(Debug)]
pub struct ReceiveSpec {
    pub listen: String,
    pub host: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub tls_dir: Option<PathBuf>,
    pub tls_allow: Vec<String>,
    pub deadline: Duration,
    pub peer_timeout: Duration,
    pub max_memory: Option<u64>,
    pub max_vcpus: Option<u32>,
    pub devices: Devices,
}

impl ReceiveSpec {
    fn from_args(a: &ReceiveArgs) -> anyhow::Result<ReceiveSpec> {
        Ok(ReceiveSpec {
            listen: a.listen.clone(),
            host: a.host.clone(),
            key_file: a.key_file.clone(),
            tls_dir: a.tls_dir.clone(),
            tls_allow: a.tls_allow.clone(),
            deadline: a.deadline,
            peer_timeout: a.peer_timeout,
            max_memory: match &a.max_memory {
                Some(m) => Some(parse_size(m).context("--max-memory")?),
                None => None,
            },
            max_vcpus: a.max_vcpus,
            devices: a.devices.parse()?,
        })
    }

    /// vm.receive-migration's body.
    pub fn from_request(r: &vmm::api::create::ReceiveRequest) -> ReceiveSpec {
        ReceiveSpec {
            listen: r.receiver_url.clone(),
            host: None,
            key_file: r.key_file.clone(),
            tls_dir: r.tls_dir.clone(),
            tls_allow: r.tls_allow.clone(),
            deadline: vmm::migrate::DEFAULT_DEADLINE,
            peer_timeout: Duration::from_millis(r.peer_timeout_ms.unwrap_or(60_000)),
            max_memory: r.max_memory,
            max_vcpus: r.max_vcpus,
            devices: Devices::default(),
        }
    }
}

/// Where the destination listens and how it takes a VM (the disks and taps given opened).
fn receive_options(
    spec: &ReceiveSpec,
) -> anyhow::Result<(vmm::migrate::Address, vmm::migrate::ReceiveOptions)> {
    let addr: vmm::migrate::Address = spec.listen.parse()?;
    let host = match &spec.host {
        Some(p) => Some(cpuid::dump::load(p).with_context(|| format!("--host {}", p.display()))?),
        None => None,
    };
    let key = spec.key_file.as_deref().map(read_key).transpose()?;
    let tls = spec
        .tls_dir
        .as_deref()
        .map(|d| vmm::migrate::DestinationTls::load(d)?.allow(spec.tls_allow.clone()))
        .transpose()?;
    if key.is_none() && tls.is_none() {
        vmm::migrate::check_local(&addr)?;
    }
    anyhow::ensure!(
        !spec.peer_timeout.is_zero(),
        "--peer-timeout must be more than 0"
    );
    let opts = vmm::migrate::ReceiveOptions {
        host,
        key,
        tls,
        deadline: spec.deadline,
        peer_timeout: spec.peer_timeout,
        devices: spec.devices.open()?,
        max_memory: spec
            .max_memory
            .unwrap_or_else(vmm::migrate::host_memory_limit),
        max_vcpus: spec.max_vcpus.unwrap_or_else(vmm::migrate::host_vcpu_limit),
    };
    Ok((addr, opts))
}

/// `ferry receive`: receives one VM ([`receive_vm`]), then serves its control socket and
/// runs it until it ends.
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
    let spec = ReceiveSpec::from_args(&a)?;
    let console = a.serial.serial.open()?;
    let vm = receive_vm(&spec, a.debug.open()?, console.output)?;
    let api = bind_api(a.api_socket.as_deref())?;
    run_vm(Arc::new(vm), api, None, console.input)
}

/// What needs root is opened first (the listener, the disks and taps given, /dev/kvm);
/// then ferry becomes --user and this thread enters the destination's filter, takes the
/// first source that authenticates (each handshake on a thread filtered as one), and
/// receives its VM on a thread filtered as the receiver, which parses the source's stream
/// and starts no thread itself (the spawner does). Returns the VM, running.
pub fn receive_vm(
    spec: &ReceiveSpec,
    debug: DebugConsole,
    console: Box<dyn std::io::Write + Send>,
) -> anyhow::Result<vmm::Vm> {
    let (addr, opts) = receive_options(spec)?;
    if opts.key.is_some() || opts.tls.is_some() {
        // The TLS library's first use costs milliseconds: not a source's.
        vmm::migrate::warm_up_tls();
    }
    vmm::vm::keep_kvm_open()?;
    let listener = vmm::migrate::Listener::bind(&addr)?;
    if let vmm::migrate::Address::Unix(path) = &addr {
        vmm::sandbox::hand_over(path)?;
    }
    vmm::sandbox::drop_privileges()?;
    vmm::sandbox::enter(vmm::sandbox::Kind::Launcher)?;
    vmm::sandbox::start_spawner().context("starting the spawner thread")?;
    say_waiting(&spec.listen, &opts);
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
    Ok(vm)
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
