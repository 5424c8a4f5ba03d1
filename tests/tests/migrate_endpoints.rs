//! The migration's endpoints as a local user meets them: key files private to their owner
//! (`ferry key generate` makes them so, a readable one is refused with one line), a Unix
//! listener of mode 0600, and a second `ferry receive` on a path where one listens already
//! refused, the first left listening. A Hello over the destination's limits is refused
//! before anything is allocated, and a VM state larger than its Hello announced is refused
//! at its config, before any vCPU state is read.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use ferry_tests::process::{ferry_bin, temp_path, Ferry};

/// `ferry args...`, which must fail with one error line: that line.
fn one_error_line(args: &[&str]) -> String {
    ferry_tests::process::one_error_line(Command::new(ferry_bin()).args(args))
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_generated_key_is_private_and_a_readable_one_is_refused() {
    let key = temp_path("endpoints.key");
    let _ = std::fs::remove_file(&key);
    let out = Command::new(ferry_bin())
        .args(["key", "generate", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&key), 0o600);
    let bytes = std::fs::read(&key).unwrap();
    assert_eq!(bytes.len(), 32);
    let line = one_error_line(&["key", "generate", key.to_str().unwrap()]);
    assert!(line.contains("exists"), "{line}");
    assert_eq!(
        std::fs::read(&key).unwrap(),
        bytes,
        "the key is left as it was"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let url = format!("unix:{}", temp_path("endpoints-key.mig").display());
    let line = one_error_line(&[
        "receive",
        "--listen",
        &url,
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert!(
        line.contains("mode 0644") && line.contains("chmod 600"),
        "{line}"
    );
}

#[test]
fn a_second_receiver_on_one_path_is_refused_and_the_first_listens_on() {
    ferry_tests::require_kvm();
    let path = temp_path("endpoints-twice.mig");
    let url = format!("unix:{}", path.display());
    let mut first = Ferry::receive(&url, &[]);
    assert_eq!(mode(&path), 0o600, "only this user may connect");
    let line = one_error_line(&["receive", "--listen", &url]);
    assert!(
        line.contains("another process is listening there"),
        "{line}"
    );
    assert!(path.exists(), "the first one's socket is still there");
    first.drain();
    assert!(
        !first.transcript().contains("error"),
        "the first receiver goes on: {}",
        first.transcript()
    );
    first.kill9();
    // A stale socket (its process gone) is replaced.
    let mut again = Ferry::receive(&url, &[]);
    again.kill9();
}

/// Sends `hello` to a `ferry receive` with `extra` arguments; returns the reason of its
/// refusal, after checking that the receiver ended with an error.
fn refusal(extra: &[&str], hello: migration::protocol::Hello) -> String {
    use migration::protocol::{self, Message};
    let path = temp_path("endpoints-limits.mig");
    let url = format!("unix:{}", path.display());
    let mut dest = Ferry::receive(&url, extra);
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    protocol::send(&mut s, &Message::Hello(hello)).unwrap();
    let reason = match protocol::recv(&mut s).unwrap() {
        Message::Refuse(r) => r,
        other => panic!("{other:?}"),
    };
    let st = dest.wait_exit(std::time::Duration::from_secs(60));
    assert!(!st.success(), "{}", dest.transcript());
    reason
}

#[test]
fn a_hello_larger_than_the_destination_takes_is_refused_before_anything_is_allocated() {
    use migration::protocol::Hello;
    ferry_tests::require_kvm();
    let profile = || r#"{"name":"x"}"#.to_string();
    // 1 TiB on a host of a few dozen GiB: the default limit (available memory) refuses it.
    let r = refusal(&[], Hello::new(1 << 40, 1, profile(), None));
    assert!(
        r.contains("1048576 MiB") && r.contains("--max-memory"),
        "{r}"
    );
    let r = refusal(
        &["--max-memory", "64M"],
        Hello::new(256 << 20, 1, profile(), None),
    );
    assert!(
        r.contains("256 MiB") && r.contains("--max-memory 64 MiB"),
        "{r}"
    );
    let r = refusal(
        &["--max-vcpus", "1"],
        Hello::new(64 << 20, 2, profile(), None),
    );
    assert!(r.contains("2 vCPUs") && r.contains("--max-vcpus 1"), "{r}");
}

/// A process's resident memory (VmRSS), bytes.
fn rss(pid: u32) -> u64 {
    ferry_tests::process::proc_status_bytes(pid, "VmRSS")
}

#[test]
fn a_touched_map_and_zero_pages_over_all_ram_do_not_back_it() {
    use migration::pages::BatchWriter;
    use migration::protocol::{self, Hello, Message};
    use std::io::Write;
    ferry_tests::require_kvm();
    const GIB: u64 = 1 << 30;
    let profile = ferry_tests::host_profile_json();
    let path = temp_path("endpoints-backing.mig");
    let url = format!("unix:{}", path.display());
    let mut dest = Ferry::receive(&url, &[]);
    let before = rss(dest.pid());
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    protocol::send(&mut s, &Message::Hello(Hello::new(GIB, 1, profile, None))).unwrap();
    assert_eq!(protocol::recv(&mut s).unwrap(), Message::Accept);
    // "Every 2 MiB block of the guest's RAM is touched": 8 words of ones.
    protocol::send(&mut s, &Message::Touched(vec![u64::MAX; 8])).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let touched = rss(dest.pid());
    // Then every page of it as a ZERO page: a few bytes per 2 MiB on the wire.
    let mut w = BatchWriter::new();
    for page in 0..GIB / 4096 {
        w.page_slot().fill(0);
        w.commit_page(page * 4096, false);
        if w.is_full() {
            s.write_all(&w.finish().to_vec()).unwrap();
            w = BatchWriter::new();
        }
    }
    if !w.is_empty() {
        s.write_all(&w.finish().to_vec()).unwrap();
    }
    protocol::send(&mut s, &Message::Sync).unwrap();
    assert_eq!(protocol::recv(&mut s).unwrap(), Message::Synced);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = rss(dest.pid());
    eprintln!(
        "destination RSS {} MiB, {} MiB a second after the Touched map, {} MiB after every page as ZERO, for a 1 GiB guest",
        before >> 20,
        touched >> 20,
        after >> 20
    );
    // The readahead's slack (64 MiB) and the machine's own memory.
    assert_eq!(vmm::migrate::PREFAULT_SLACK, 64 << 20);
    let bound: u64 = 128 << 20;
    for now in [touched, after] {
        assert!(
            now - before < bound,
            "backed {} MiB, the bound is {} MiB",
            (now - before) >> 20,
            bound >> 20
        );
    }
    drop(s);
    let _ = dest.wait_exit(std::time::Duration::from_secs(60));
}

#[test]
fn a_vm_state_larger_than_the_hello_announced_is_refused_at_its_config() {
    use migration::protocol::{self, Hello, Message};
    use std::io::Write;
    ferry_tests::require_kvm();
    // A real guest's state, claiming 256 vCPUs after a Hello that announced one.
    let sock = temp_path("endpoints-state.sock");
    let mut f = ferry_tests::process::run_tiny(&ferry_tests::tiny::LONG_COUNT, &[], &sock);
    f.wait_line(std::time::Duration::from_secs(60), |l| {
        ferry_tests::process::count_line(l).is_some()
    });
    let snap = temp_path("endpoints-state.snap");
    let (ok, out) = f.ctl(&["snapshot", snap.to_str().unwrap(), "--stop"]);
    assert!(ok, "{out}");
    let mut state = vmm::snapshot::read_file(&snap).unwrap();
    state.memory.clear();
    state.vcpus = (0..256)
        .map(|id| migration::VcpuState {
            id,
            ..state.vcpus[0].clone()
        })
        .collect();
    state.config.vcpus = 256;
    let mut stream = Vec::new();
    migration::write_vm(&mut stream, &state).unwrap();

    let path = temp_path("endpoints-state.mig");
    let url = format!("unix:{}", path.display());
    let mut dest = Ferry::receive(&url, &[]);
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let hello = Hello::new(
        state.config.memory,
        1,
        state.cpu_profile.clone(),
        state.guest_cpu.clone(),
    );
    protocol::send(&mut s, &Message::Hello(hello)).unwrap();
    assert_eq!(protocol::recv(&mut s).unwrap(), Message::Accept);
    protocol::send(&mut s, &Message::State).unwrap();
    let _ = s.write_all(&stream);
    let st = dest.wait_exit(std::time::Duration::from_secs(60));
    assert!(!st.success(), "{}", dest.transcript());
    let text = dest.stderr_lines().join("\n");
    assert!(
        text.contains("its vCPU count is 256, the Hello announced 1"),
        "{text}"
    );
}
