//! `ferry`: the command line. Prints for people; errors are one line on stderr and a
//! non-zero exit status.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

mod cpu_cmd;
use clap::{Parser, Subcommand};
use serde_json::json;
use vmm::config::{parse_size, VmConfig, DEFAULT_CMDLINE};
use vmm::devices::serial::FlushingWriter;
use vmm::{api, vm, VmEvent};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "A KVM virtual machine monitor that live-migrates guests across CPU vendors"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot a Linux guest; its console is this terminal (stdout, stdin).
    Run(RunArgs),
    /// Send a command to a running ferry's control socket.
    Ctl(CtlArgs),
    /// Continue a VM from a snapshot file in this process.
    Restore(RestoreArgs),
    /// Wait for one VM from a migrating ferry, check it, restore it and run it.
    Receive(ReceiveArgs),
    /// The guest CPU model: dump this host, baseline hosts, check and show profiles.
    #[command(subcommand)]
    Cpu(cpu_cmd::CpuCmd),
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// The kernel: an ELF vmlinux with a PVH entry note, or a bzImage.
    #[arg(long, required_unless_present = "image", conflicts_with = "image")]
    kernel: Option<PathBuf>,
    /// Instead of a kernel, a raw machine-code image: `real` mode images load and start at
    /// 0x1000, `long64` ones at 0x10000 in 64-bit mode with identity paging (tests/tiny).
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// How to enter --image.
    #[arg(long, value_parser = ["real", "long64"], default_value = "long64")]
    entry: String,
    /// An initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest RAM, like 512M or 1G.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Serve the control socket at this path.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// The guest CPU profile: a built-in name (see `ferry cpu show`) or a profile file.
    #[arg(long)]
    cpu: Option<String>,
    #[command(flatten)]
    debug: DebugConsoleArg,
}

#[derive(Parser, Debug)]
struct DebugConsoleArg {
    /// Append the bytes the guest writes to I/O port 0xe9 (the debug console) to FILE.
    #[arg(long, value_name = "FILE")]
    debug_console: Option<PathBuf>,
}

impl DebugConsoleArg {
    /// Attaches the debug console file, if one was given, to `vm`.
    fn attach(&self, vm: &vmm::Vm) -> anyhow::Result<()> {
        if let Some(p) = &self.debug_console {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .with_context(|| format!("--debug-console {}", p.display()))?;
            vm.set_debug_console(Box::new(f));
        }
        Ok(())
    }
}

#[derive(Parser, Debug)]
struct RestoreArgs {
    /// A snapshot written by `ferry ctl snapshot`, or the same compressed with zstd.
    file: PathBuf,
    /// Keep the guest paused until `ferry ctl ... resume`.
    #[arg(long)]
    paused: bool,
    /// Serve the control socket at this path.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    #[command(flatten)]
    debug: DebugConsoleArg,
}

#[derive(Parser, Debug)]
struct ReceiveArgs {
    /// Where to listen: tcp:ADDR:PORT or unix:PATH.
    #[arg(long)]
    listen: String,
    /// Serve the control socket at this path once the VM runs.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Check the incoming CPU profile against this recorded host (a CPU dump) instead of
    /// this one.
    #[arg(long)]
    host: Option<PathBuf>,
    /// Take only a source that proves this shared key (16 to 4096 bytes), and prove it to
    /// the source. Without one, ferry listens on a Unix socket or a loopback address only.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Give up on a source that sends or takes nothing for this long (the guest then stays
    /// with the source).
    #[arg(long, default_value = "60s", value_parser = vmm::config::parse_duration)]
    peer_timeout: Duration,
    #[command(flatten)]
    debug: DebugConsoleArg,
}

/// Reads and checks a shared key file.
fn read_key(path: &std::path::Path) -> anyhow::Result<migration::auth::Key> {
    let bytes = std::fs::read(path).with_context(|| format!("--key-file {}", path.display()))?;
    migration::auth::Key::new(&bytes).with_context(|| format!("--key-file {}", path.display()))
}

#[derive(Parser, Debug)]
struct CtlArgs {
    /// The control socket of the ferry to talk to.
    #[arg(long)]
    api_socket: PathBuf,
    /// Print the response as JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand, Debug, Clone)]
enum CtlCmd {
    /// Live-migrate the VM to a ferry waiting with `ferry receive` (tcp:HOST:PORT or
    /// unix:PATH); this ferry exits 0 once the destination has it. On a terminal a progress
    /// line shows the round, bytes left, rate, predicted downtime and throttle.
    Migrate {
        url: String,
        /// Switch over once the predicted downtime fits this (like 5ms).
        #[arg(long, default_value = "20ms", value_parser = vmm::config::parse_duration)]
        max_downtime: Duration,
        /// Cancel (the guest stays here) if it has not switched over by then.
        #[arg(long, default_value = "60s", value_parser = vmm::config::parse_duration)]
        timeout: Duration,
        /// Send at most this many bytes per second (like 100M); unlimited by default.
        #[arg(long)]
        max_bandwidth: Option<String>,
        /// Most vCPU time throttling may take, percent (0: never throttle).
        #[arg(long, default_value_t = 99, value_parser = clap::value_parser!(u8).range(0..=99))]
        max_throttle: u8,
        /// Prove this shared key to the destination (`ferry receive --key-file`).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Give up on a destination that sends or takes nothing for this long (before
        /// Commit the guest then runs on here).
        #[arg(long, default_value = "60s", value_parser = vmm::config::parse_duration)]
        peer_timeout: Duration,
    },
    /// Cancel the migration in progress; the guest keeps running here.
    Cancel,
    /// Pause, write the whole VM to FILE, and resume (or end the VM with --stop).
    Snapshot {
        file: PathBuf,
        /// End the VM after writing (ferry then exits 0).
        #[arg(long)]
        stop: bool,
    },
    /// The VM's state.
    Status,
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume,
    /// The guest CPU: profile, and the CPUID table requested and as KVM holds it.
    Cpuid,
    /// End the VM; that ferry exits with status 0.
    Stop,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Ctl(a) => ctl(a),
        Cmd::Restore(a) => restore(a),
        Cmd::Receive(a) => receive(a),
        Cmd::Cpu(c) => cpu_cmd::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: most messages already include
/// their cause's text, which the chain would repeat.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let memory = parse_size(&a.memory).context("--memory")?;
    let console = Box::new(FlushingWriter(std::io::stdout()));
    let vm = match (a.kernel, a.image) {
        (Some(kernel), _) => {
            let cfg = VmConfig {
                memory,
                vcpus: a.vcpus,
                kernel,
                initrd: a.initrd,
                cmdline: a.cmdline,
                cpu: a.cpu,
            };
            vm::build(&cfg, console)?
        }
        (None, Some(image)) => {
            boot_image(&image, &a.entry, memory, a.vcpus, a.cpu.as_deref(), console)?
        }
        (None, None) => anyhow::bail!("give --kernel or --image"),
    };
    a.debug.attach(&vm)?;
    serve(vm, a.api_socket.as_deref(), true)
}

fn boot_image(
    image: &std::path::Path,
    entry: &str,
    memory: u64,
    vcpus: u32,
    cpu: Option<&str>,
    console: Box<dyn std::io::Write + Send>,
) -> anyhow::Result<vmm::Vm> {
    use vmm::boot::{layout::BOOT_STACK_TOP, EntryPoint};
    let bytes = std::fs::read(image).with_context(|| format!("image {}", image.display()))?;
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
    let kvm = vm::open_kvm()?;
    vmm::config::validate_memory(memory)?;
    vmm::config::validate_vcpus(vcpus, vm::max_vcpus(&kvm))?;
    drop(kvm);
    let mut vm = vmm::Vm::new(memory, vcpus, console)?;
    if let Some(spec) = cpu {
        let p = vmm::cpu_model::load_profile(spec, vm.host_cpu())?;
        vm.set_cpu_profile(p)?;
    }
    vm.boot_raw(&bytes, addr, entry)?;
    Ok(vm)
}

/// Runs a built (or restored) VM until it ends: control socket, console input, events.
fn serve(
    vm: vmm::Vm,
    api_socket: Option<&std::path::Path>,
    start: bool,
) -> anyhow::Result<ExitCode> {
    let vm = Arc::new(vm);
    let _api = match api_socket {
        Some(p) => Some(api::ApiServer::start(p, vm.clone())?),
        None => None,
    };
    let input = vm.clone();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n @ 1..) = stdin.read(&mut buf) {
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let took = input.serial_input(rest);
                    rest = &rest[took..];
                    if took == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })
        .context("starting the console input thread")?;
    if start {
        vm.start()?;
    }
    let event = loop {
        if let Some(e) = vm.next_event(Duration::from_secs(1)) {
            break e;
        }
    };
    vm.shutdown();
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

fn restore(a: RestoreArgs) -> anyhow::Result<ExitCode> {
    let state = vmm::snapshot::read_file(&a.file)
        .with_context(|| format!("snapshot {}", a.file.display()))?;
    let vm = vmm::Vm::restore(&state, Box::new(FlushingWriter(std::io::stdout())))
        .with_context(|| format!("restoring {}", a.file.display()))?;
    a.debug.attach(&vm)?;
    serve(vm, a.api_socket.as_deref(), !a.paused)
}

fn receive(a: ReceiveArgs) -> anyhow::Result<ExitCode> {
    let addr: vmm::migrate::Address = a.listen.parse()?;
    let host = match &a.host {
        Some(p) => Some(cpuid::dump::load(p).with_context(|| format!("--host {}", p.display()))?),
        None => None,
    };
    let key = a.key_file.as_deref().map(read_key).transpose()?;
    if key.is_none() {
        vmm::migrate::check_local(&addr)?;
    }
    anyhow::ensure!(
        !a.peer_timeout.is_zero(),
        "--peer-timeout must be more than 0"
    );
    let listener = vmm::migrate::Listener::bind(&addr)?;
    let opts = vmm::migrate::ReceiveOptions {
        host,
        key,
        peer_timeout: a.peer_timeout,
    };
    eprintln!(
        "ferry: waiting for a VM on {} ({})",
        a.listen,
        if opts.key.is_some() {
            "the source must prove the shared key"
        } else {
            "no key: local connections only"
        }
    );
    // Run the guest as soon as the source commits: the control socket and the rest follow.
    let mut commit_to_run = Duration::ZERO;
    let vm = vmm::migrate::receive_from(
        listener,
        &opts,
        Box::new(FlushingWriter(std::io::stdout())),
        |vm| {
            let committed = std::time::Instant::now();
            a.debug.attach(vm).map_err(|e| format!("{e:#}"))?;
            vm.start().map_err(|e| e.to_string())?;
            commit_to_run = committed.elapsed();
            Ok(())
        },
    )?;
    eprintln!(
        "ferry: received the VM ({} MiB, {} vCPUs, CPU profile {}); running it ({:.1} ms after Commit)",
        vm.memory_size() >> 20,
        vm.num_vcpus(),
        vm.cpu_profile().name,
        commit_to_run.as_secs_f64() * 1e3
    );
    serve(vm, a.api_socket.as_deref(), false)
}

/// One progress line of a running migration.
fn progress_line(p: &serde_json::Value) -> String {
    let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
    format!(
        "migrating: round {}, {:.1} MiB sent, {:.1} MiB left in the round, {:.0} MB/s, predicted downtime {:.1} ms, throttle {}%",
        p["round"],
        f("sent_bytes") / 1048576.0,
        f("remaining_bytes") / 1048576.0,
        f("rate_mbps"),
        f("predicted_downtime_ms"),
        p["throttle_pct"]
    )
}

/// The final report of a migration, for people.
fn report_line(r: &serde_json::Value) -> String {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    let all: Vec<String> = r["pages_per_round"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.to_string())
        .collect();
    // The first rounds and the last ones; a long middle is elided.
    let pages = if all.len() > 12 {
        let mut p = all[..8].to_vec();
        p.push("...".into());
        p.extend_from_slice(&all[all.len() - 4..]);
        p
    } else {
        all
    };
    let outcome = r["outcome"].as_str().unwrap_or("?");
    let mut line = format!(
        "migration {outcome}: total {:.1} ms, downtime {:.1} ms (target {:.1} ms), {:.1} MiB on the wire at {:.0} MB/s, {} rounds (pages per round: {}), {} zero and {} untouched pages skipped, throttle {}%",
        f("total_ms"),
        f("downtime_ms"),
        f("max_downtime_ms"),
        f("bytes") / 1048576.0,
        f("bandwidth_mbps"),
        r["rounds"],
        pages.join(" "),
        r["zero_pages"],
        r["untouched_pages"],
        r["throttle_pct"]
    );
    if let Some(why) = r["reason"].as_str() {
        line.push_str(&format!("; {why}"));
    }
    line
}

fn ctl(a: CtlArgs) -> anyhow::Result<ExitCode> {
    let (cmd, req) = match &a.cmd {
        CtlCmd::Status => ("status", json!({"cmd": "status"})),
        CtlCmd::Pause => ("pause", json!({"cmd": "pause"})),
        CtlCmd::Resume => ("resume", json!({"cmd": "resume"})),
        CtlCmd::Stop => ("stop", json!({"cmd": "stop"})),
        CtlCmd::Cpuid => ("cpuid", json!({"cmd": "cpuid"})),
        CtlCmd::Cancel => ("cancel", json!({"cmd": "cancel"})),
        CtlCmd::Migrate {
            url,
            max_downtime,
            timeout,
            max_bandwidth,
            max_throttle,
            key_file,
            peer_timeout,
        } => {
            // The server reads the key file: send its path absolute.
            let key_file = match key_file {
                Some(k) => {
                    Some(std::path::absolute(k).with_context(|| format!("{}", k.display()))?)
                }
                None => None,
            };
            let bw = match max_bandwidth {
                Some(b) => Some(parse_size(b).context("--max-bandwidth")?),
                None => None,
            };
            (
                "migrate",
                json!({
                    "cmd": "migrate",
                    "url": url,
                    "max_downtime_ms": max_downtime.as_secs_f64() * 1e3,
                    "timeout_ms": timeout.as_secs_f64() * 1e3,
                    "max_bandwidth": bw,
                    "max_throttle": max_throttle,
                    "key_file": key_file,
                    "peer_timeout_ms": peer_timeout.as_secs_f64() * 1e3,
                    "progress": true,
                }),
            )
        }
        CtlCmd::Snapshot { file, stop } => {
            // The server resolves the path in its own working directory: send it absolute.
            let path = std::path::absolute(file).with_context(|| format!("{}", file.display()))?;
            (
                "snapshot",
                json!({"cmd": "snapshot", "path": path, "stop": stop}),
            )
        }
    };
    use std::io::IsTerminal;
    let show_progress = !a.json && std::io::stderr().is_terminal();
    let mut shown = false;
    let mut on_progress = |p: &serde_json::Value| {
        if show_progress {
            shown = true;
            eprint!("\r\x1b[K{}", progress_line(p));
        }
    };
    let resp = api::request_with_progress(
        &a.api_socket,
        &req,
        Duration::from_secs(600),
        &mut on_progress,
    )?;
    if shown {
        eprintln!();
    }
    let ok = resp.get("ok").and_then(|v| v.as_bool()) == Some(true);
    if a.json {
        println!("{resp}");
    } else if cmd == "migrate" && resp.get("report").is_some() {
        println!("{}", report_line(&resp["report"]));
    } else if ok && cmd == "snapshot" {
        println!(
            "snapshot: {} bytes to {} in {:.1} ms ({} memory ranges); VM {}",
            resp["bytes"],
            resp["path"].as_str().unwrap_or("?"),
            resp["ms"].as_f64().unwrap_or(0.0),
            resp["memory_ranges"],
            resp["state"].as_str().unwrap_or("?")
        );
    } else if ok && cmd == "cpuid" {
        let p = &resp["profile"];
        let id = &p["identity"];
        println!(
            "profile: {} ({} family {} model {} stepping {}, {} features)",
            p["name"].as_str().unwrap_or("?"),
            id["vendor"].as_str().unwrap_or("?"),
            id["family"],
            id["model"],
            id["stepping"],
            p["features"].as_array().map_or(0, |f| f.len())
        );
        let forced: Vec<&str> = resp["forced"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        if !forced.is_empty() {
            println!("changed by this host's KVM: {}", forced.join(" "));
        }
        println!("(--json prints both tables)");
    } else if ok {
        let state = resp.get("state").and_then(|v| v.as_str()).unwrap_or("?");
        match resp.get("vcpus").and_then(|v| v.as_array()) {
            Some(v) => println!(
                "state: {state}, vcpus: {}, memory: {} MiB",
                v.len(),
                resp["memory"].as_u64().unwrap_or(0) >> 20
            ),
            None => println!("state: {state}"),
        }
    }
    if ok {
        Ok(ExitCode::SUCCESS)
    } else {
        let err = resp
            .get("error")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown error");
        anyhow::bail!("{cmd}: {err}")
    }
}
