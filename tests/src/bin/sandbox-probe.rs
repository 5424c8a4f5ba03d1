//! Puts one thread under a ferry thread kind's seccomp filter, with ferry's SIGSYS report,
//! and has it make a call no kind allows:
//!
//!   sandbox-probe on|log KIND [CALL]   KIND as the report names it ("vcpu", ...); CALL:
//!                                      getppid (default), ioctl (FIONREAD), openat (a
//!                                      file created for writing), exec (an mmap with
//!                                      PROT_EXEC)
//!
//! With `on` the process ends with ferry's one-line report and status 159; with `log` the
//! call goes through and it prints what it returned ("ppid N" for getppid).

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
    let call = args.get(2).cloned().unwrap_or_else(|| "getppid".into());
    let probe = std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || {
            sandbox::enter_or_exit(kind);
            match call.as_str() {
                "getppid" => format!("ppid {}", std::os::unix::process::parent_id()),
                "ioctl" => format!("ioctl {}", sandbox::probe::ioctl()),
                "exec" => format!("exec {}", sandbox::probe::exec_mapping()),
                "openat" => {
                    let p =
                        std::env::temp_dir().join(format!("sandbox-probe-{}", std::process::id()));
                    let made = std::fs::File::create(&p).is_ok();
                    let _ = std::fs::remove_file(&p);
                    format!("openat {made}")
                }
                other => format!("unknown call {other}"),
            }
        })
        .expect("spawning the probe thread");
    match probe.join() {
        Ok(line) => println!("{line}"),
        Err(_) => std::process::exit(1),
    }
}
