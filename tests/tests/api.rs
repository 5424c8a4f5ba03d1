//! The control socket's HTTP API (docs/api.md, docs/openapi.json) against a tiny guest in
//! this process: through the typed client, and as raw HTTP requests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use ferry_tests::process::temp_path;
use ferry_tests::tiny::*;
use serde_json::Value;
use vmm::api::client::{call, request};
use vmm::api::wire::{Request, StateAnswer, Status, VmStatus};
use vmm::api::{ApiServer, MAX_REQUEST};
use vmm::VmEvent;

const LIMIT: Duration = Duration::from_secs(30);

/// Raw HTTP on one connection: the status line and body of the answer to each request.
struct Raw {
    conn: UnixStream,
    reader: vmm::api::http::Reader,
}

impl Raw {
    fn new(path: &std::path::Path) -> Raw {
        let conn = UnixStream::connect(path).unwrap();
        conn.set_read_timeout(Some(LIMIT)).unwrap();
        Raw {
            conn,
            reader: Default::default(),
        }
    }

    fn send(&mut self, raw: &[u8]) -> (u16, Value) {
        self.conn.write_all(raw).unwrap();
        let r = self.reader.response(&mut self.conn, 1 << 20).unwrap();
        let body = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&r.body).unwrap()
        };
        (r.status, body)
    }
}

/// Several requests on one connection, then malformed ones: each answered with a status
/// and a code naming what was wrong; the connection kept until the message itself cannot
/// be read.
fn several_and_malformed_requests(path: &std::path::Path) {
    let mut raw = Raw::new(path);
    let (s, b) = raw.send(b"GET /api/v1/ferry.status HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((s, &b["state"]), (200, &Value::from("running")), "{b}");
    let put = |path: &str, body: &str| {
        format!(
            "PUT {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let (s, b) = raw.send(put("/api/v1/vm.snapshot", "not json").as_bytes());
    assert_eq!((s, &b["code"]), (400, &Value::from("bad-request")), "{b}");
    let (s, b) = raw.send(
        put(
            "/api/v1/vm.snapshot",
            r#"{"destination_url":"file:///x","stopp":1}"#,
        )
        .as_bytes(),
    );
    assert!(
        s == 400 && b["message"].as_str().unwrap().contains("stopp"),
        "{b}"
    );
    let (s, b) = raw.send(b"GET /api/v1/vm.reboot HTTP/1.1\r\n\r\n");
    assert_eq!((s, &b["code"]), (404, &Value::from("not-found")), "{b}");
    let (s, b) = raw.send(b"GET /api/v1/vm.pause HTTP/1.1\r\n\r\n");
    assert_eq!((s, &b["code"]), (405, &Value::from("not-found")), "{b}");
    let (s, b) = raw.send(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n");
    assert_eq!(
        (s, &b["version"]),
        (200, &Value::from(env!("CARGO_PKG_VERSION")))
    );
    let (s, b) = raw.send(b"GET /api/v1/ferry.openapi HTTP/1.1\r\n\r\n");
    assert_eq!((s, &b["openapi"]), (200, &Value::from("3.0.3")));
    // A body over the cap: refused before it is read, and the connection closed.
    let huge = format!(
        "PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        MAX_REQUEST + 1
    );
    let (s, b) = raw.send(huge.as_bytes());
    assert_eq!((s, &b["code"]), (413, &Value::from("bad-request")), "{b}");
    let mut rest = Vec::new();
    assert_eq!(
        raw.conn.read_to_end(&mut rest).unwrap(),
        0,
        "closed after a 413"
    );
    let (s, _) = Raw::new(path).send(b"\x16\x03\x01 not http\r\n\r\n");
    assert_eq!(s, 400);
}

/// Prometheus' text format: `# HELP`/`# TYPE` lines, then `name{labels} value` samples of
/// the families declared.
fn check_metrics(text: &str) {
    let mut declared = std::collections::BTreeSet::new();
    let mut samples = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            declared.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        let name = series.split('{').next().unwrap();
        assert!(declared.contains(name), "{name} has no TYPE: {text}");
        samples += 1;
    }
    assert!(samples >= 10, "{text}");
    assert!(text.contains("ferry_vm_memory_bytes 67108864"), "{text}");
    assert!(text.contains("ferry_vm_vcpus 2"), "{text}");
    assert!(
        text.contains(r#"ferry_vcpu_exits_total{vcpu="1",reason="io_out"} "#),
        "{text}"
    );
    assert!(
        text.contains(r#"ferry_migrations_total{outcome="started"} 0"#),
        "{text}"
    );
}

/// vm.info of the paused 2-vCPU guest.
fn paused_info(path: &std::path::Path) {
    let info = request(path, "GET", "/api/v1/vm.info", None, LIMIT).unwrap();
    let info: Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(info["state"], "Paused", "{info}");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2, "{info}");
    assert_eq!(info["memory_actual_size"], 64 << 20, "{info}");
}

/// ferry.metrics in Prometheus' format; ferry.cpu-check of a profile this host runs and of
/// one that does not exist.
fn metrics_and_cpu_check(path: &std::path::Path) {
    let metrics = request(path, "GET", "/api/v1/ferry.metrics", None, LIMIT).unwrap();
    assert_eq!(metrics.status, 200);
    check_metrics(&String::from_utf8(metrics.body).unwrap());

    let check = |profile: &str| {
        let body = serde_json::json!({ "profile": profile }).to_string();
        let r = request(
            path,
            "PUT",
            "/api/v1/ferry.cpu-check",
            Some(body.as_bytes()),
            LIMIT,
        );
        let r = r.unwrap();
        (r.status, serde_json::from_slice::<Value>(&r.body).unwrap())
    };
    let (st, ok) = check("default");
    assert_eq!((st, &ok["runs"]), (200, &Value::from(true)), "{ok}");
    assert_eq!(ok["missing"], serde_json::json!([]), "{ok}");
    let (st, bad) = check("no-such-profile");
    assert_eq!(
        (st, &bad["code"]),
        (404, &Value::from("not-found")),
        "{bad}"
    );
    assert!(
        bad["message"].as_str().unwrap().contains("no-such-profile"),
        "{bad}"
    );
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

    let status = call::<Status>(&path, &Request::Status, LIMIT)
        .unwrap()
        .answer
        .unwrap();
    assert_eq!(status.state, VmStatus::Running);
    assert_eq!(status.vcpus, [VmStatus::Running, VmStatus::Running]);
    assert_eq!(status.memory, 64 << 20);
    assert_eq!(status.migration, None);

    let state = |req: Request| {
        let r = call::<StateAnswer>(&path, &req, LIMIT).unwrap();
        (r.line, r.answer.unwrap().state)
    };
    let (line, paused) = state(Request::Pause);
    assert_eq!(paused, VmStatus::Paused);
    assert_eq!(
        line, r#"{"ok":true,"state":"paused"}"#,
        "ferry ctl --json's line"
    );
    paused_info(&path);
    let st = call::<Status>(&path, &Request::Status, LIMIT).unwrap();
    assert_eq!(st.answer.unwrap().vcpus, [VmStatus::Paused; 2]);
    assert_eq!(state(Request::Resume).1, VmStatus::Running);
    let counters = call::<Value>(&path, &Request::Counters, LIMIT).unwrap();
    let counters = counters.answer.unwrap();
    assert_eq!(counters["migration"]["started"], 0, "{counters}");
    assert!(counters["vcpu1"]["io_out"].as_u64().is_some(), "{counters}");

    metrics_and_cpu_check(&path);

    let none = call::<Value>(&path, &Request::Cancel, LIMIT).unwrap();
    assert!(none.line.contains(r#""ok":false"#), "{}", none.line);
    let none = none.answer.unwrap_err();
    assert_eq!(none.code.as_str(), "wrong-state", "{none:?}");
    let none = request(&path, "GET", "/api/v1/ferry.progress", None, LIMIT).unwrap();
    assert_eq!(none.status, 409);

    several_and_malformed_requests(&path);

    // vm.shutdown is answered, then the VM gets its stop request.
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
fn connections_beyond_the_cap_are_answered_busy_and_closed() {
    use vmm::api::MAX_CONNECTIONS;
    ferry_tests::sandbox_on(None);
    let t = TinyVm::new(&REAL_HLT, 1);
    let vm = Arc::new(t.vm);
    let path = temp_path("capped.sock");
    let _server = ApiServer::start(&path, vm).unwrap();
    let ask = |s: &mut UnixStream| -> String {
        s.set_read_timeout(Some(LIMIT)).unwrap();
        // The connection over the cap may be closed before this request arrives.
        let _ = s.write_all(b"GET /api/v1/ferry.status HTTP/1.1\r\n\r\n");
        let r = vmm::api::http::Reader::default()
            .response(s, 1 << 20)
            .unwrap();
        format!("{} {}", r.status, String::from_utf8_lossy(&r.body))
    };
    let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    for s in &mut held {
        assert!(
            ask(s).starts_with("200 "),
            "a connection under the cap is served"
        );
    }
    let mut one_more = UnixStream::connect(&path).unwrap();
    let answer = ask(&mut one_more);
    assert!(answer.starts_with("409 "), "{answer}");
    assert!(
        answer.contains(&format!("more than {MAX_CONNECTIONS} control connections")),
        "{answer}"
    );
    drop(held.pop());
    wait_for("a connection slot to free", LIMIT, || {
        let mut s = UnixStream::connect(&path).unwrap();
        ask(&mut s).starts_with("200 ")
    });
}
