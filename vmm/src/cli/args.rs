//! The command line's arguments (clap): `ferry run | restore | receive | ctl | cpu`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vmm::config::DEFAULT_CMDLINE;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    propagate_version = true,
    about = "A KVM virtual machine monitor that live-migrates guests across CPU vendors"
)]
pub struct Cli {
    /// What ferry logs to stderr: error, warn (the default), info, debug or trace (before
    /// or after the command; RUST_LOG, env_logger's syntax, says it per module instead).
    #[arg(long, global = true, value_enum)]
    pub log_level: Option<LogLevel>,
    /// More log lines: -v info, -vv debug, -vvv trace.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Cli {
    /// The log level the command line asks for (--log-level, else -v), if any.
    pub fn log_filter(&self) -> Option<log::LevelFilter> {
        use log::LevelFilter as F;
        match (self.log_level, self.verbose) {
            (Some(l), _) => Some(match l {
                LogLevel::Error => F::Error,
                LogLevel::Warn => F::Warn,
                LogLevel::Info => F::Info,
                LogLevel::Debug => F::Debug,
                LogLevel::Trace => F::Trace,
            }),
            (None, 0) => None,
            (None, 1) => Some(F::Info),
            (None, 2) => Some(F::Debug),
            (None, _) => Some(F::Trace),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Boot a Linux guest; its console is this terminal (stdout, stdin).
    Run(RunArgs),
    /// Send a command to a running ferry's control socket.
    Ctl(CtlArgs),
    /// Continue a VM from a snapshot file in this process.
    Restore(RestoreArgs),
    /// Wait for one VM from a migrating ferry, check it, restore it and run it.
    Receive(ReceiveArgs),
    /// Serve the control API with no VM yet: a program then creates and boots one,
    /// restores one or receives one through it (docs/api.md).
    Serve(ServeArgs),
    /// The guest CPU model: dump this host, baseline hosts, check and show profiles.
    #[command(subcommand)]
    Cpu(super::cpu::CpuCmd),
    /// Shared keys for migrations between hosts without a CA.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Certificates for migrations over TLS.
    #[command(subcommand)]
    Tls(TlsCmd),
}

#[derive(Subcommand, Debug)]
pub enum TlsCmd {
    /// Write a new CA and, signed by it, a destination's and a source's certificate into
    /// DIR (for --tls-dir on both sides; QEMU's tls-creds-x509 reads the same layout). The
    /// CA's key goes outside DIR (DIR.ca-key.pem by default): keep it off both hosts.
    Generate {
        dir: PathBuf,
        /// A host name or address the source will connect to (repeat for more).
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
        /// The source certificate's name, which a destination's --tls-allow may require.
        #[arg(long, default_value = "ferry-source")]
        source_name: String,
        /// Days the certificates are valid from now.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Where to write the CA's private key (default: DIR.ca-key.pem, beside DIR).
        #[arg(long, value_name = "FILE")]
        ca_key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Write a new key file: 32 random bytes, mode 0600 (an existing file is refused).
    Generate { file: PathBuf },
}

#[derive(Parser, Debug)]
pub struct RunArgs {
    /// The kernel: an ELF vmlinux with a PVH entry note, or a bzImage.
    #[arg(long, required_unless_present = "image", conflicts_with = "image")]
    pub kernel: Option<PathBuf>,
    /// Instead of a kernel, a raw machine-code image: `real` mode images load and start at
    /// 0x1000, `long64` ones at 0x10000 in 64-bit mode with identity paging (tests/tiny).
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// How to enter --image.
    #[arg(long, value_parser = ["real", "long64"], default_value = "long64", requires = "image")]
    pub entry: String,
    /// An initramfs (with --kernel).
    #[arg(long, conflicts_with = "image")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest RAM, like 512M or 1G.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Serve the control socket at this path.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// The guest CPU profile: a built-in name (see `ferry cpu show`) or a profile file.
    #[arg(long)]
    pub cpu: Option<String>,
    #[command(flatten)]
    pub devices: DeviceArgs,
    #[command(flatten)]
    pub serial: SerialArg,
    #[command(flatten)]
    pub debug: DebugConsoleArg,
    #[command(flatten)]
    pub monitor: MonitorArg,
    #[command(flatten)]
    pub sandbox: SandboxArg,
}

#[derive(Parser, Debug)]
pub struct DeviceArgs {
    /// A virtio-blk disk backed by a raw image file: path=FILE[,readonly=on] (repeatable;
    /// the guest sees them as vda, vdb, ... in this order). Restoring or receiving a guest:
    /// its disks, which must be the same images (default: the paths it was saved with).
    #[arg(long, value_name = "path=FILE[,readonly=on]")]
    pub disk: Vec<String>,
    /// A virtio-net device on an existing tap: tap=NAME[,mac=MAC] (repeatable). Restoring or
    /// receiving a guest: the taps its cards go on, keeping their MACs (default: the taps it
    /// was saved with).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    pub net: Vec<String>,
}

impl DeviceArgs {
    /// The disks and network cards asked for, each checked (one line naming a bad one).
    pub fn parse(&self) -> anyhow::Result<vmm::devices::virtio::backends::Devices> {
        let disks = self.disk.iter().map(|d| vmm::config::parse_disk(d));
        let nets = self.net.iter().map(|n| vmm::config::parse_net(n));
        Ok(vmm::devices::virtio::backends::Devices {
            disks: disks
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?,
            nets: nets.collect::<Result<_, _>>().map_err(anyhow::Error::msg)?,
        })
    }
}

#[derive(Parser, Debug)]
pub struct DebugConsoleArg {
    /// Append the bytes the guest writes to I/O port 0xe9 (the debug console) to FILE.
    #[arg(long, value_name = "FILE")]
    pub debug_console: Option<PathBuf>,
    /// Print, when a vCPU first enters the guest, the start-up milestones (ms after main)
    /// and the CPU time ferry has used so far, as one line on stderr.
    #[arg(long)]
    pub timeline: bool,
}

impl DebugConsoleArg {
    /// Opens the debug console file, if one was given (before ferry's filters forbid it).
    pub fn open(&self) -> anyhow::Result<DebugConsole> {
        let file = match &self.debug_console {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
                    .with_context(|| format!("--debug-console {}", p.display()))?,
            ),
            None => None,
        };
        Ok(DebugConsole {
            file,
            timeline: self.timeline,
        })
    }
}

/// The debug console file, opened, and whether to print the timeline.
#[derive(Debug)]
pub struct DebugConsole {
    file: Option<std::fs::File>,
    timeline: bool,
}

impl DebugConsole {
    /// Attaches the debug console file, if one was given, to `vm`.
    pub fn attach(self, vm: &vmm::Vm) {
        if self.timeline {
            vmm::timeline::print_at_first_run();
        }
        if let Some(f) = self.file {
            vm.set_debug_console(Box::new(f));
        }
    }
}

#[derive(Parser, Debug)]
pub struct SerialArg {
    /// Where the guest's serial console goes: tty (this terminal: stdout and stdin),
    /// file=PATH (output only), pty (a pseudo-terminal; its name is printed),
    /// socket=PATH (a Unix socket one client at a time attaches to), or off.
    #[arg(
        long,
        value_name = "tty|file=PATH|pty|socket=PATH|off",
        default_value = "tty"
    )]
    pub serial: vmm::devices::console::Serial,
}

#[derive(Parser, Debug)]
pub struct MonitorArg {
    /// Write one JSON line per event (booted, paused, resumed, snapshotted, migration
    /// started, round, switched, finished or failed, shutdown) to FILE, or to the open
    /// descriptor N (docs/api.md, "Events").
    #[arg(long, value_name = "path=FILE|fd=N")]
    pub event_monitor: Option<vmm::monitor::Target>,
}

impl MonitorArg {
    /// Starts the event monitor, if one was asked for (before ferry gives up root).
    pub fn start(&self) -> anyhow::Result<()> {
        if let Some(t) = &self.event_monitor {
            vmm::monitor::start(t)?;
            vmm::monitor::emit("vmm", "starting", None);
        }
        Ok(())
    }
}

#[derive(Parser, Debug)]
pub struct SandboxArg {
    /// Seccomp filters on this ferry's threads once they are set up: on (a call outside a
    /// thread's filter stops ferry with one line naming it), log (let it through; the
    /// kernel logs it), off.
    #[arg(long, value_enum, default_value_t = vmm::sandbox::Mode::On)]
    pub seccomp: vmm::sandbox::Mode,
    /// Once /dev/kvm, disks, taps and sockets are open, become this user (numeric
    /// UID[:GID]; without GID, the user's primary group): its group alone, no capabilities.
    #[arg(long, value_name = "UID[:GID]")]
    pub user: Option<vmm::sandbox::User>,
}

impl SandboxArg {
    /// Sets the process's seccomp mode and the user it will become (before any thread of
    /// the VM starts); with a user, /dev/kvm is opened now, for a VM built after the drop.
    pub fn apply(&self) -> anyhow::Result<()> {
        match self.seccomp {
            vmm::sandbox::Mode::On => {}
            vmm::sandbox::Mode::Log => eprintln!(
                "ferry: warning: --seccomp log: calls outside ferry's filters are let through (the kernel logs them)"
            ),
            vmm::sandbox::Mode::Off => eprintln!(
                "ferry: warning: --seccomp off: ferry's threads run without system call filters"
            ),
        }
        vmm::sandbox::set_mode(self.seccomp, self.user)?;
        // Before any other thread: SIGTERM and SIGINT go to a thread of their own.
        vmm::signals::start().context("starting the signal thread")?;
        if self.user.is_some() {
            vmm::vm::keep_kvm_open()?;
        }
        Ok(())
    }
}

#[derive(Parser, Debug)]
pub struct RestoreArgs {
    /// A snapshot written by `ferry ctl snapshot`, or the same compressed with zstd.
    pub file: PathBuf,
    /// Keep the guest paused until `ferry ctl ... resume`.
    #[arg(long)]
    pub paused: bool,
    /// Serve the control socket at this path.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    #[command(flatten)]
    pub devices: DeviceArgs,
    #[command(flatten)]
    pub serial: SerialArg,
    #[command(flatten)]
    pub debug: DebugConsoleArg,
    #[command(flatten)]
    pub monitor: MonitorArg,
    #[command(flatten)]
    pub sandbox: SandboxArg,
}

#[derive(Parser, Debug)]
pub struct ServeArgs {
    /// Serve the control API at this path (HTTP on a Unix socket, mode 0600).
    #[arg(long)]
    pub api_socket: PathBuf,
    #[command(flatten)]
    pub serial: SerialArg,
    #[command(flatten)]
    pub debug: DebugConsoleArg,
    #[command(flatten)]
    pub monitor: MonitorArg,
    #[command(flatten)]
    pub sandbox: SandboxArg,
}

#[derive(Parser, Debug)]
pub struct ReceiveArgs {
    /// Where to listen: tcp:ADDR:PORT or unix:PATH.
    #[arg(long)]
    pub listen: String,
    /// Serve the control socket at this path once the VM runs.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Check the incoming CPU profile against this recorded host (a CPU dump) instead of
    /// this one.
    #[arg(long)]
    pub host: Option<PathBuf>,
    /// Take only a source that proves this shared key (32 to 4096 bytes), and prove it to
    /// the source. Without one, ferry listens on a Unix socket or a loopback address only.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Run the migration over TLS with the certificates in DIR (ca-cert.pem,
    /// server-cert.pem, server-key.pem): only a source whose certificate the CA signed.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Take only a source whose certificate names NAME (repeatable; `ferry tls generate
    /// --source-name`); without it, any certificate the CA signed.
    #[arg(long = "tls-allow", value_name = "NAME", requires = "tls_dir")]
    pub tls_allow: Vec<String>,
    /// Give up on a migration that has not handed over the guest this long after the
    /// source connected.
    #[arg(long, default_value = "1h", value_parser = vmm::config::parse_duration)]
    pub deadline: Duration,
    /// Give up on a source that sends or takes nothing for this long (the guest then stays
    /// with the source).
    #[arg(long, default_value = "60s", value_parser = vmm::config::parse_duration)]
    pub peer_timeout: Duration,
    /// The most guest RAM to take, like 16G (default: this host's available memory less an
    /// eighth); a larger guest is refused before anything is allocated.
    #[arg(long)]
    pub max_memory: Option<String>,
    /// The most vCPUs to take (default: four per host CPU).
    #[arg(long)]
    pub max_vcpus: Option<u32>,
    #[command(flatten)]
    pub devices: DeviceArgs,
    #[command(flatten)]
    pub serial: SerialArg,
    #[command(flatten)]
    pub debug: DebugConsoleArg,
    #[command(flatten)]
    pub monitor: MonitorArg,
    #[command(flatten)]
    pub sandbox: SandboxArg,
}

/// Reads and checks a shared key file (private to its owner, 32 to 4096 bytes).
pub fn read_key(path: &std::path::Path) -> anyhow::Result<migration::auth::Key> {
    Ok(vmm::migrate::key::load(path)?)
}

#[derive(Parser, Debug)]
pub struct CtlArgs {
    /// The control socket of the ferry to talk to.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Print the answer as JSON (before or after the command).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: CtlCmd,
}

#[derive(Subcommand, Debug, Clone)]
pub enum CtlCmd {
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
        /// Run the migration over TLS with the certificates in DIR (ca-cert.pem,
        /// client-cert.pem, client-key.pem), checking the destination's certificate.
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        /// The name the destination's certificate must carry (default: the host of
        /// tcp:HOST:PORT, or localhost for a Unix socket).
        #[arg(long, requires = "tls_dir")]
        tls_name: Option<String>,
        /// Give up on a destination that sends or takes nothing for this long (before
        /// Commit the guest then runs on here).
        #[arg(long, default_value = "60s", value_parser = vmm::config::parse_duration)]
        peer_timeout: Duration,
        /// Postcopy: if precopy has not converged after N rounds (0: at once), run the
        /// guest at the destination and fetch the rest of its memory on demand. If the
        /// link then dies the guest is lost there and kept paused here.
        #[arg(long, value_name = "N")]
        postcopy_after: Option<u32>,
        /// Without --key-file or --tls-dir, send the guest's memory and state unencrypted
        /// even to an address off this host, or to a Unix socket another user listens on
        /// (refused otherwise: anyone on the path could read or change them).
        #[arg(long)]
        insecure: bool,
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
    /// This ferry's version and features (vmm.ping).
    Ping,
    /// Whether the host of that ferry runs a CPU profile (a built-in name, `default`, or a
    /// profile file), as `ferry cpu check` says for this one (ferry.cpu-check).
    CpuCheck { profile: String },
    /// A `ferry serve`: keep a VM's configuration, a JSON file as vm.create takes it
    /// (docs/api.md; `-`: stdin).
    Create { config: PathBuf },
    /// A `ferry serve`: build and start the VM created.
    Boot,
    /// A `ferry serve`: drop the configuration created and not booted.
    Delete,
    /// A `ferry serve`: continue the VM of a snapshot file here.
    Restore {
        file: PathBuf,
        /// Keep the guest paused until `resume`.
        #[arg(long)]
        paused: bool,
    },
    /// A `ferry serve`: wait for a VM from a migrating ferry at tcp:ADDR:PORT or unix:PATH
    /// and run it (answers once it runs here).
    Receive { url: String },
    /// The VM's configuration and state (vm.info).
    Info,
    /// The VM's counters: vCPU exits, migrations (vm.counters).
    Counters,
    /// The same counters, and the VM's memory and state, in Prometheus' text format
    /// (ferry.metrics).
    Metrics,
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume,
    /// The guest CPU: profile, and the CPUID table requested and as KVM holds it.
    Cpuid,
    /// End the VM; that ferry exits with status 0.
    Stop,
}
