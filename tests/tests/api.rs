//! The control socket protocol (docs/api.md) against a tiny guest in this process, through
//! the typed client and as raw lines.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use ferry_tests::process::temp_path;
use ferry_tests::tiny::*;
use serde_json::Value;
use vmm::api::client::call;
use vmm::api::wire::{Request, StateAnswer, Status, VmStatus};
use vmm::api::{ApiServer, MAX_REQUEST};
use vmm::VmEvent;

const LIMIT: Duration = Duration::from_secs(30);

/// Several requests on one connection, then malformed ones: each answered with an error
/// naming what was wrong, the connection kept.
fn several_and_malformed_requests(path: &std::path::Path) {
    let mut conn = UnixStream::connect(path).unwrap();
    conn.set_read_timeout(Some(LIMIT)).unwrap();
    let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
    let mut send = |raw: &[u8]| -> Value {
        conn.write_all(raw).unwrap();
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()
    };
    assert_eq!(send(b"{\"cmd\":\"status\"}\n")["ok"], true);
    let r = send(b"not json\n");
    assert!(r["error"].as_str().unwrap().contains("not JSON"), "{r}");
    assert_eq!(r["code"], "bad-request", "{r}");
    let r = send(b"{\"command\":\"status\"}\n");
    assert!(r["error"].as_str().unwrap().contains("\"cmd\""), "{r}");
    let mut huge = vec![b' '; MAX_REQUEST + 10];
    huge.push(b'\n');
    let r = send(&huge);
    assert!(r["error"].as_str().unwrap().contains("longer than"), "{r}");
}

#[test]
fn status_pause_resume_stop_and_bad_requests() {
    // The control socket's threads and the vCPUs under ferry's filters, as in `ferry run`.
    ferry_tests::sandbox_on(None);
    let t = TinyVm::new(&LONG_RING3, 2);
    let vm = Arc::new(t.vm);
    let path = temp_path("api.sock");
    let _server = ApiServer::start(&path, vm.clone()).expect("start the API server");
    assert!(
        ApiServer::start(&path, vm.clone()).is_err(),
        "a second server on a live socket must be refused"
    );
    vm.start().unwrap();

    let status = call::<Status>(&path, &Request::Status, LIMIT, &mut |_| {})
        .unwrap()
        .answer
        .unwrap();
    assert_eq!(status.state, VmStatus::Running);
    assert_eq!(status.vcpus, [VmStatus::Running, VmStatus::Running]);
    assert_eq!(status.memory, 64 << 20);
    assert_eq!(status.migration, None);

    let state = |req: Request| {
        let r = call::<StateAnswer>(&path, &req, LIMIT, &mut |_| {}).unwrap();
        (r.line, r.answer.unwrap().state)
    };
    let (line, paused) = state(Request::Pause);
    assert_eq!(paused, VmStatus::Paused);
    assert_eq!(
        line, r#"{"ok":true,"state":"paused"}"#,
        "the documented line"
    );
    let st = call::<Status>(&path, &Request::Status, LIMIT, &mut |_| {}).unwrap();
    assert_eq!(st.answer.unwrap().vcpus, [VmStatus::Paused; 2]);
    assert_eq!(state(Request::Resume).1, VmStatus::Running);

    let unknown =
        vmm::api::client::call_raw::<Value>(&path, br#"{"cmd":"reboot"}"#, LIMIT, &mut |_| {})
            .unwrap()
            .answer
            .unwrap_err();
    assert!(unknown.error.contains("\"reboot\""), "{unknown:?}");
    assert_eq!(unknown.code, vmm::codes::Code::BadRequest, "{unknown:?}");
    let none = call::<Value>(&path, &Request::Cancel, LIMIT, &mut |_| {}).unwrap();
    let none = none.answer.unwrap_err();
    assert_eq!(none.code.as_str(), "wrong-state", "{none:?}");

    several_and_malformed_requests(&path);

    // stop is answered, then the VM gets its stop request.
    assert_eq!(state(Request::Stop).1, VmStatus::Stopped);
    assert_eq!(
        vm.next_event(LIMIT),
        Some(VmEvent::StopRequested {
            by: "control socket"
        })
    );
}

#[test]
fn the_socket_is_private_and_never_replaces_a_regular_file() {
    use std::os::unix::fs::PermissionsExt;
    let t = TinyVm::new(&REAL_HLT, 1);
    let vm = Arc::new(t.vm);
    let file = temp_path("precious.img");
    std::fs::write(&file, b"data").unwrap();
    let e = ApiServer::start(&file, vm.clone()).unwrap_err().to_string();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    let path = temp_path("private.sock");
    let _server = ApiServer::start(&path, vm).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn connections_beyond_the_cap_are_answered_with_a_failure_and_closed() {
    use vmm::api::MAX_CONNECTIONS;
    ferry_tests::sandbox_on(None);
    let t = TinyVm::new(&REAL_HLT, 1);
    let vm = Arc::new(t.vm);
    let path = temp_path("capped.sock");
    let _server = ApiServer::start(&path, vm).unwrap();
    let ask = |s: &mut UnixStream| -> String {
        s.set_read_timeout(Some(LIMIT)).unwrap();
        // The connection over the cap may be closed before this request arrives.
        let _ = s.write_all(b"{\"cmd\":\"status\"}\n");
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        line
    };
    let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    for s in &mut held {
        assert!(
            ask(s).contains("\"ok\":true"),
            "a connection under the cap is served"
        );
    }
    let mut one_more = UnixStream::connect(&path).unwrap();
    let answer = ask(&mut one_more);
    assert!(
        answer.contains(&format!("more than {MAX_CONNECTIONS} control connections")),
        "{answer}"
    );
    drop(held.pop());
    wait_for("a connection slot to free", LIMIT, || {
        let mut s = UnixStream::connect(&path).unwrap();
        ask(&mut s).contains("\"ok\":true")
    });
}
