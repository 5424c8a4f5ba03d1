//! docs/openapi.json against a live ferry, by a schema-driven API tester from PyPI
//! (schemathesis, installed by scripts/test into the cache; its path in
//! FERRY_SCHEMATHESIS): a bounded number of generated requests per route, valid and
//! invalid, and every answer checked against the document (no 5xx, each status documented,
//! each body of its schema, invalid input refused, 405 with Allow). The routes that end the
//! VM or write files where a generated body says (vm.shutdown, vmm.shutdown, vm.snapshot,
//! vm.send-migration) are left out: their own tests drive them.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::process::{count_line, run_tiny, temp_path};
use ferry_tests::tiny::LONG_COUNT;

/// Generated requests per route and phase.
const EXAMPLES: &str = "25";

fn schemathesis() -> PathBuf {
    let Some(p) = std::env::var_os("FERRY_SCHEMATHESIS") else {
        panic!(
            "FERRY_SCHEMATHESIS is not set: run ./scripts/test (it installs schemathesis), or set it to a schemathesis binary"
        );
    };
    let p = PathBuf::from(p);
    assert!(
        p.exists(),
        "FERRY_SCHEMATHESIS={} does not exist",
        p.display()
    );
    p
}

/// A TCP port on loopback whose connections are relayed to the Unix socket `to` (the tester
/// speaks HTTP over TCP only).
fn relay(to: &Path) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let to = to.to_path_buf();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let Ok(unix) = UnixStream::connect(&to) else {
                continue;
            };
            let pipe = |mut a: TcpStream, mut b: UnixStream| {
                let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a2, &mut b2);
                    let _ = b2.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut b, &mut a);
                    let _ = a.shutdown(std::net::Shutdown::Write);
                });
            };
            pipe(conn, unix);
        }
    });
    port
}

#[test]
fn the_openapi_document_holds_against_a_live_ferry() {
    ferry_tests::require_kvm();
    let tester = schemathesis();
    let sock = temp_path("schema.sock");
    let mut ferry = run_tiny(&LONG_COUNT, &[], &sock);
    ferry.wait_line(Duration::from_secs(60), |l| count_line(l).is_some());
    let port = relay(&sock);
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let reports = temp_path("schemathesis-report");
    let mut cmd = Command::new(&tester);
    cmd.args(["run", doc, "--url"])
        .arg(format!("http://127.0.0.1:{port}/api/v1"))
        .args(["--max-examples", EXAMPLES, "--seed", "7", "--workers", "1"])
        .args([
            "--checks",
            "all",
            "--no-color",
            "--generation-database",
            "none",
        ])
        .args(["--request-timeout", "30"])
        .arg("--report-dir")
        .arg(&reports);
    for path in [
        "/vm.shutdown",
        "/vmm.shutdown",
        "/vm.snapshot",
        "/vm.send-migration",
    ] {
        cmd.args(["--exclude-path", path]);
    }
    let out = cmd.output().expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis:\n{text}");
    let routes = vmm::api::routes::ROUTES.len() - 4;
    assert!(
        text.contains(&format!("Tested: {routes}")),
        "every route but the four: {text}"
    );
    // The VM went through it all (paused and resumed at random) and runs on once resumed.
    assert!(ferry.try_status().is_none(), "{}", ferry.transcript());
    let (ok, resumed) = ferry.ctl(&["resume"]);
    assert!(ok, "{resumed}");
    ferry.still_counting(Duration::from_secs(30), 5);
}
