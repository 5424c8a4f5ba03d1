//! Puts one thread under a ferry thread kind's seccomp filter, with ferry's SIGSYS report,
//! and has it make a call no kind allows (getppid):
//!
//!   sandbox-probe on|log KIND     KIND as the report names it ("vcpu", "control socket", ...)
//!
//! With `on` the process ends with ferry's one-line report and status 159; with `log` the
//! call goes through and it prints "ppid N".

use vmm::sandbox::{self, Kind, Mode};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(kind)) = (args.first(), args.get(1)) else {
        eprintln!("usage: sandbox-probe on|log KIND");
        std::process::exit(2);
    };
    let mode = match mode.as_str() {
        "on" => Mode::On,
        "log" => Mode::Log,
        other => {
            eprintln!("sandbox-probe: unknown mode {other}");
            std::process::exit(2);
        }
    };
    let Some(kind) = Kind::ALL.into_iter().find(|k| k.name() == kind) else {
        eprintln!("sandbox-probe: unknown kind {kind}");
        std::process::exit(2);
    };
    if let Err(e) = sandbox::set_mode(mode, None) {
        eprintln!("sandbox-probe: {e}");
        std::process::exit(1);
    }
    let probe = std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || {
            sandbox::enter_or_exit(kind);
            std::os::unix::process::parent_id()
        })
        .expect("spawning the probe thread");
    match probe.join() {
        Ok(ppid) => println!("ppid {ppid}"),
        Err(_) => std::process::exit(1),
    }
}
