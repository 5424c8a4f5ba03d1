//! Driving real `ferry` processes: spawn, read the guest console line by line, talk to the
//! control socket, and wait for the exit status. Every wait has a limit that guards against
//! hangs; none of them is a timing assertion.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub use crate::binary::ferry_bin;

/// A line of output from a ferry process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Out(String),
    /// The last stdout bytes of a process that ended without a final newline.
    OutTail(String),
    Err(String),
}

/// A running ferry process whose output is collected line by line.
#[derive(Debug)]
pub struct Ferry {
    child: Child,
    lines: Receiver<Line>,
    /// Every line seen so far, stdout and stderr.
    pub seen: Vec<Line>,
    pub api_socket: Option<PathBuf>,
}

fn pump(
    r: impl std::io::Read + Send + 'static,
    tx: std::sync::mpsc::Sender<Line>,
    wrap: fn(String) -> Line,
) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        loop {
            let mut buf = Vec::new();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let complete = buf.last() == Some(&b'\n');
            if complete {
                buf.pop();
            }
            let text = String::from_utf8_lossy(&buf).into_owned();
            let line = match wrap(text) {
                // Output that ended without a newline (the process stopped mid-line).
                Line::Out(t) if !complete => Line::OutTail(t),
                other => other,
            };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

impl Ferry {
    /// Starts `ferry` with `args`, stdin closed.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Ferry {
        Ferry::start(Command::new(ferry_bin()), args)
    }

    /// Starts `cmd` (ferry, or a command that runs it, like `ip netns exec`) with `args`
    /// added, stdin closed.
    pub fn start<S: AsRef<std::ffi::OsStr>>(mut cmd: Command, args: &[S]) -> Ferry {
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let (tx, rx) = channel();
        pump(child.stdout.take().unwrap(), tx.clone(), Line::Out);
        pump(child.stderr.take().unwrap(), tx, Line::Err);
        let api_socket = args
            .iter()
            .position(|a| a.as_ref() == "--api-socket")
            .and_then(|i| args.get(i + 1))
            .map(|p| PathBuf::from(p.as_ref()));
        Ferry {
            child,
            lines: rx,
            seen: Vec::new(),
            api_socket,
        }
    }

    /// Returns the next stdout line satisfying `pred`, or panics after `limit` with the output.
    pub fn wait_line(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.next_matching(limit, false, pred)
    }

    /// Returns the next stderr line satisfying `pred` (stdout lines are kept), or panics.
    pub fn wait_line_err(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.next_matching(limit, true, pred)
    }

    fn next_matching(
        &mut self,
        limit: Duration,
        stderr: bool,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    let text = match (&line, stderr) {
                        (Line::Out(s), false) | (Line::Err(s), true) => s,
                        _ => continue,
                    };
                    if pred(text) {
                        return text.clone();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no matching line within {limit:?}; output:\n{}",
                        self.transcript()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("ferry closed its output; output:\n{}", self.transcript())
                }
            }
        }
    }

    /// Returns the next stdout line satisfying `pred`, or the exit status if the process
    /// ends first (its output drained); panics after `limit`.
    pub fn wait_line_or_exit(
        &mut self,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    match line {
                        Line::Out(s) if pred(&s) => return Ok(s),
                        _ => continue,
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
            }
            if self.child.try_wait().expect("wait for ferry").is_some() {
                return Err(self.wait_exit(limit));
            }
        }
        let _ = self.child.kill();
        panic!(
            "no matching line and no exit within {limit:?}; output:\n{}",
            self.transcript()
        )
    }

    /// The exit status if ferry has exited, else None (it runs on).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for ferry")
    }

    /// The next stdout line satisfying `pred` within `limit`, or None if none comes (the
    /// process may have ended, or runs on without one).
    pub fn line_within(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Line::Out(s) = line {
                        if pred(&s) {
                            return Some(s);
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
        None
    }

    /// `ferry ctl stop`, then requires that the process exits with status 0.
    pub fn stop(&mut self) {
        let (ok, out) = self.ctl(&["stop"]);
        assert!(ok, "stop: {out}");
        assert!(
            self.wait_exit(Duration::from_secs(60)).success(),
            "{}",
            self.transcript()
        );
    }

    /// Waits for the process to exit; drains its output.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for ferry") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "ferry did not exit within {limit:?}; output:\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts `ferry receive --listen url` with `extra` arguments and returns once it says
    /// it is waiting (its listener is bound then).
    pub fn receive(url: &str, extra: &[&str]) -> Ferry {
        let mut args = vec!["receive", "--listen", url];
        args.extend_from_slice(extra);
        let mut f = Ferry::spawn(&args);
        f.wait_line_err(Duration::from_secs(120), |l| l.contains("waiting for a VM"));
        f
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL (nothing of it runs on) and reaps it.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9 ferry");
        self.child.wait().expect("reap ferry");
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
    }

    /// Takes the lines written so far without waiting.
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// Runs `ferry ctl --api-socket <socket> <args>` and returns (success, stdout + stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        let socket = self.api_socket.as_ref().expect("started with --api-socket");
        let out = Command::new(ferry_bin())
            .arg("ctl")
            .arg("--api-socket")
            .arg(socket)
            .args(args)
            .output()
            .expect("run ferry ctl");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Everything seen so far, for failure messages.
    pub fn transcript(&self) -> String {
        self.seen
            .iter()
            .map(|l| match l {
                Line::Out(s) => format!("  | {s}\n"),
                Line::OutTail(s) => format!("  | {s}(no newline)\n"),
                Line::Err(s) => format!("  ! {s}\n"),
            })
            .collect()
    }

    /// Lines written to stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.seen
            .iter()
            .filter_map(|l| match l {
                Line::Err(s) => Some(s.as_str()),
                Line::Out(_) | Line::OutTail(_) => None,
            })
            .collect()
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free on loopback right now.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("its address")
        .port()
}

/// The heartbeat number of the Linux test guest's `HB <n> ...` console line (after the
/// printk timestamp).
pub fn heartbeat(line: &str) -> Option<u64> {
    let rest = &line[line.find("] HB ")? + 5..];
    rest.split_whitespace().next()?.parse().ok()
}

/// A value the counting tiny guest (tests/tiny/long_count.S) printed: a line of 16 hex digits.
pub fn count_line(l: &str) -> Option<u64> {
    (l.len() == 16)
        .then(|| u64::from_str_radix(l, 16).ok())
        .flatten()
}

/// Checks that the counting guest's values in `text` (its consoles joined in order) go on
/// by exactly one, with no gap or repeat, and that there are at least `min` of them;
/// returns how many.
pub fn assert_counts_by_one(text: &str, min: usize) -> usize {
    let all: Vec<u64> = text.lines().filter_map(count_line).collect();
    assert!(
        all.len() >= min,
        "{} values, expected at least {min}",
        all.len()
    );
    for w in all.windows(2) {
        assert_eq!(w[1], w[0] + 1, "the count must go on by one:\n{text}");
    }
    all.len()
}

/// `ferry run --image` of a tiny guest with 64 MiB, `extra` arguments and a control socket
/// at `sock`; returns once the socket exists.
pub fn run_tiny(image: &crate::tiny::TinyImage, extra: &[&str], sock: &Path) -> Ferry {
    // A file per call: tests run in parallel, and one rewriting the image another ferry is
    // loading would hand that one a truncated guest.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let img = temp_path(&format!("{}-{n}.bin", image.name));
    std::fs::write(&img, image.bytes).expect("write the image");
    let mut args = vec![
        "run",
        "--image",
        img.to_str().expect("utf-8 path"),
        "--memory",
        "64M",
    ];
    args.extend_from_slice(extra);
    args.extend(["--api-socket", sock.to_str().expect("utf-8 path")]);
    let f = Ferry::spawn(&args);
    crate::tiny::wait_for("the control socket", Duration::from_secs(60), || {
        sock.exists()
    });
    f
}

/// A fresh path for a socket in a per-process temporary directory.
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir.join(name)
}

impl Ferry {
    /// The highest count a counting guest has printed so far.
    pub fn last_count(&self) -> u64 {
        self.stdout_text()
            .lines()
            .filter_map(count_line)
            .max()
            .unwrap_or(0)
    }

    /// A counting guest still runs here: `status` says running, and its count rises by
    /// more than `by` within `limit`.
    pub fn still_counting(&mut self, limit: Duration, by: u64) {
        let (ok, st) = self.ctl(&["status"]);
        assert!(ok && st.contains("running"), "{st}");
        let last = self.last_count();
        self.wait_line(limit, |l| count_line(l).is_some_and(|n| n > last + by));
    }

    /// Everything the process wrote to stdout, byte for byte (after it exited).
    pub fn stdout_text(&self) -> String {
        let mut out = String::new();
        for l in &self.seen {
            match l {
                Line::Out(s) => {
                    out.push_str(s);
                    out.push('\n');
                }
                Line::OutTail(s) => out.push_str(s),
                Line::Err(_) => {}
            }
        }
        out
    }
}

/// Runs `cmd` (a ferry command that must fail): requires exit status 1 and exactly one
/// stderr line starting `ferry: error: `, and returns that line.
pub fn one_error_line(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run ferry");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{cmd:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].starts_with("ferry: error: "), "{err}");
    lines[0].to_string()
}

/// `ferry run` of the test guest (PVH vmlinux unless `kernel` says otherwise): 256 MiB,
/// `vcpus` vCPUs, the guest's command line plus `cmdline`, `extra` arguments, and a
/// control socket at `socket`.
pub fn run_guest(
    kernel: Option<&Path>,
    vcpus: u32,
    cmdline: &str,
    extra: &[&str],
    socket: &Path,
) -> Ferry {
    Ferry::spawn(&guest_args(kernel, vcpus, cmdline, extra, socket))
}

/// The arguments of [`run_guest`]'s `ferry run`.
pub fn guest_args(
    kernel: Option<&Path>,
    vcpus: u32,
    cmdline: &str,
    extra: &[&str],
    socket: &Path,
) -> Vec<std::ffi::OsString> {
    let g = crate::guest::guest();
    let kernel = kernel.unwrap_or(&g.vmlinux);
    let mut args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.into(),
        "--initrd".into(),
        (&g.initramfs).into(),
        "--memory".into(),
        "256M".into(),
        "--vcpus".into(),
        vcpus.to_string().into(),
        "--cmdline".into(),
        g.cmdline_with(cmdline).into(),
        "--api-socket".into(),
        socket.into(),
    ];
    args.extend(extra.iter().map(|a| a.into()));
    args
}

/// A line of `/proc/PID/status` in bytes: `key` is `VmRSS` (resident now) or `VmHWM` (the
/// most it has been resident).
pub fn proc_status_bytes(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        * 1024
}

/// One request to a control socket's HTTP API (`route` under /api/v1/): its status and JSON
/// body (Null when it has none), within 120 s.
pub fn http(
    sock: &Path,
    method: &str,
    route: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let body = body.map(|b| b.to_string().into_bytes());
    let path = format!("/api/v1/{route}");
    let limit = Duration::from_secs(120);
    let r = vmm::api::client::request(sock, method, &path, body.as_deref(), limit)
        .unwrap_or_else(|e| panic!("{method} {route}: {e}"));
    let v = match r.body.is_empty() {
        true => serde_json::Value::Null,
        false => serde_json::from_slice(&r.body).unwrap(),
    };
    (r.status, v)
}
