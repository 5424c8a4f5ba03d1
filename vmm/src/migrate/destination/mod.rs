//! The destination side: the CPU check, memory into guest RAM, the state, Commit.
//!
//! ```text
//! handshakes.rs  the listener: up to MAX_HANDSHAKES sources at once, key or TLS first
//! admission.rs   what this side takes: its limits, the Hello against this host
//! error.rs       why this side refuses a VM or cannot go on with one, typed
//! mod.rs         one source's migration driven through migration::receiver's states
//! driver.rs      the I/O and the machine behind each of the receiver's actions
//! frames.rs      page frames into guest RAM, each run checked against RAM first
//! prefault.rs    backing round 0's RAM ahead of the pages
//! postcopy/      the guest running here while its missing pages come on demand
//! ```

use std::io::{Read, Write};
use std::time::Duration;

use cpuid::CpuidDump;
use migration::auth::Key;
use migration::receiver::{Input, Receiver};

use crate::devices::virtio::backends::Opened as HostDevices;
use crate::vm::Vm;

use super::*;
use driver::{Driver, Step};

mod admission;
mod driver;
mod error;
mod frames;
mod handshakes;
mod postcopy;
mod prefault;

pub use admission::{host_memory_limit, host_vcpu_limit};
pub use error::ReceiveError;
pub use handshakes::{accept_source, Source, MAX_HANDSHAKES};
pub use postcopy::uffd::keep_open as keep_userfaultfd_open;
pub use postcopy::Stats as PostcopyStats;
pub use prefault::SLACK as PREFAULT_SLACK;

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
    start: impl FnOnce(&Vm) -> Result<(), crate::vm::Error>,
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
    start: impl FnOnce(&Vm) -> Result<(), crate::vm::Error>,
) -> Result<Vm, Error> {
    let source = handshakes::accept_source(listener, &opts)?;
    receive_source(source, opts, console, start)
}

/// Receives the VM from a source that has connected and authenticated
/// ([`super::accept_source`]): its `--deadline` bounds every read and write until the guest
/// is handed over. `ferry receive` runs this on a thread of its own, filtered as the
/// receiver: it parses the source's stream.
pub fn receive_source(
    source: handshakes::Source,
    opts: ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), crate::vm::Error>,
) -> Result<Vm, Error> {
    let handshakes::Source { conn, lifted, .. } = source;
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
    start: impl FnOnce(&Vm) -> Result<(), crate::vm::Error>,
) -> Result<Vm, Error> {
    receive_on(conn, opts, console, start, &|| {})
}

/// [`receive_with`], calling `handed_over` once the source has been told Running.
fn receive_on(
    mut conn: impl Read + Write,
    mut opts: ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), crate::vm::Error>,
    handed_over: &dyn Fn(),
) -> Result<Vm, Error> {
    let began = std::time::Instant::now();
    let mut rx = Receiver::new();
    let mut d = Driver::new(&mut conn, console);
    let mut start = Some(start);
    // The outcome of an action the machine waits for, handed to it instead of a read.
    let mut outcome: Option<Input<ReceiveError>> = None;
    loop {
        let input = match outcome.take() {
            Some(i) => i,
            None if began.elapsed() > opts.deadline => {
                return Err(d.deadline_passed(opts.deadline, rx.phase()))
            }
            None => d.read(&rx)?,
        };
        let action = match rx.step(input) {
            Ok(a) => a,
            Err(f) => return Err(d.fail(f)),
        };
        match d.act(action, rx.phase(), &mut opts, &mut start)? {
            Step::Go(next) => outcome = next,
            Step::HandedOver => {
                handed_over();
                return d.postcopy_then_vm();
            }
        }
    }
}
