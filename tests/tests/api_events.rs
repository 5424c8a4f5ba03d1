//! Cloud Hypervisor's routes driven with plain HTTP requests over the Unix socket between two
//! ferry processes (ping, info, pause, resume, snapshot, send-migration, shutdown), the event
//! monitor's stream on both sides checked line by line, and a refused migration's status
//! and code.

use std::path::Path;
use std::time::Duration;

use ferry_tests::process::{count_line, http, run_tiny, temp_path, Ferry};
use ferry_tests::tiny::LONG_COUNT;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);

/// The events written to `file`: (source, event, properties), checked to be one JSON
/// object per line with timestamps that never go back.
fn events(file: &Path) -> Vec<(String, String, Value)> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut last = 0.0;
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            let t = v["timestamp"]["secs"].as_f64().unwrap()
                + v["timestamp"]["nanos"].as_f64().unwrap() / 1e9;
            assert!(t >= last, "time went back: {l}");
            last = t;
            let s = |k: &str| {
                v[k].as_str()
                    .unwrap_or_else(|| panic!("{k}: {l}"))
                    .to_string()
            };
            (s("source"), s("event"), v["properties"].clone())
        })
        .collect()
}

fn names(events: &[(String, String, Value)]) -> Vec<String> {
    events.iter().map(|(s, e, _)| format!("{s}:{e}")).collect()
}

#[test]
fn a_migration_driven_by_http_and_its_event_streams() {
    ferry_tests::require_kvm();
    let (src_events, dst_events) = (temp_path("src.events"), temp_path("dst.events"));
    let (src_sock, dst_sock) = (temp_path("ev-src.sock"), temp_path("ev-dst.sock"));
    let mig = temp_path("ev-mig.sock");
    let url = format!("unix:{}", mig.display());
    let dst_monitor = format!("path={}", dst_events.display());
    let mut dst = Ferry::receive(
        &url,
        &[
            "--event-monitor",
            &dst_monitor,
            "--api-socket",
            dst_sock.to_str().unwrap(),
        ],
    );
    let src_monitor = format!("path={}", src_events.display());
    let mut src = run_tiny(&LONG_COUNT, &["--event-monitor", &src_monitor], &src_sock);
    src.wait_line(LIMIT, |l| count_line(l).is_some());

    let snap = temp_path("ev.snap");
    let migrated = drive_source(&src_sock, &snap, &url);
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    dst.wait_line(LIMIT, |l| count_line(l).is_some());
    let (_, info) = http(&dst_sock, "GET", "vm.info", None);
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(
        http(&dst_sock, "PUT", "vmm.shutdown", None),
        (204, Value::Null)
    );
    assert!(dst.wait_exit(LIMIT).success(), "{}", dst.transcript());

    check_source_events(&src_events, &snap, &url, &migrated);
    let got = names(&events(&dst_events));
    assert_eq!(
        got,
        [
            "vmm:starting",
            "vm:migration-receive-ready",
            "vm:migration-receive-started",
            "vm:migration-receive-finished",
            "vm:shutdown",
            "vmm:shutdown",
        ],
        "the destination's events"
    );
}

/// ping, pause, info, resume, snapshot and send-migration over HTTP: the migration's answer.
fn drive_source(src_sock: &Path, snap: &Path, url: &str) -> Value {
    let (s, ping) = http(src_sock, "GET", "vmm.ping", None);
    assert_eq!(
        (s, &ping["version"]),
        (200, &json!(env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(http(src_sock, "PUT", "vm.pause", None), (204, Value::Null));
    let (_, info) = http(src_sock, "GET", "vm.info", None);
    assert_eq!(info["state"], "Paused", "{info}");
    assert_eq!(http(src_sock, "PUT", "vm.resume", None), (204, Value::Null));
    let url_of = format!("file://{}", snap.display());
    let (s, written) = http(
        src_sock,
        "PUT",
        "vm.snapshot",
        Some(json!({ "destination_url": url_of })),
    );
    assert_eq!(s, 200, "{written}");
    assert!(std::fs::metadata(snap).unwrap().len() > 0);
    let (s, migrated) = http(
        src_sock,
        "PUT",
        "vm.send-migration",
        Some(
            json!({ "destination_url": url, "local": false, "downtime_ms": 300, "timeout_strategy": "Cancel", "connections": 1, "memory_mode": "Precopy", "tls_dir": null }),
        ),
    );
    assert_eq!(s, 200, "{migrated}");
    assert_eq!(migrated["report"]["outcome"], "completed", "{migrated}");
    migrated
}

/// The source's events, in order, with their properties.
fn check_source_events(file: &Path, snap: &Path, url: &str, migrated: &Value) {
    let src_ev = events(file);
    let got = names(&src_ev);
    let rounds = got.iter().filter(|e| *e == "vm:migration-round").count();
    assert!(rounds >= 1, "{got:?}");
    let mut expected: Vec<&str> = vec![
        "vmm:starting",
        "vm:booted",
        "vm:paused",
        "vm:resumed",
        "vm:snapshotted",
        "vm:migration-started",
    ];
    expected.extend(std::iter::repeat_n("vm:migration-round", rounds));
    expected.extend([
        "vm:migration-switched",
        "vm:migration-finished",
        "vm:shutdown",
        "vmm:shutdown",
    ]);
    assert_eq!(got, expected, "the source's events");
    let props = |name: &str| &src_ev.iter().find(|(_, e, _)| e == name).unwrap().2;
    assert_eq!(props("snapshotted")["path"], json!(snap), "{src_ev:?}");
    assert_eq!(props("migration-started")["destination_url"], json!(url));
    assert_eq!(props("migration-round")["round"], 0, "{src_ev:?}");
    assert_eq!(props("migration-switched")["postcopy"], false);
    assert_eq!(
        props("migration-finished")["downtime_ms"],
        migrated["report"]["downtime_ms"]
    );
    assert_eq!(props("shutdown")["reason"], "stop-requested");
}

#[test]
fn a_refused_migration_answers_its_status_and_code_and_the_guest_runs_on() {
    ferry_tests::require_kvm();
    let events_file = temp_path("refused.events");
    let mig = temp_path("refused-mig.sock");
    let url = format!("unix:{}", mig.display());
    let _dst = Ferry::receive(&url, &["--max-memory", "16M"]);
    let sock = temp_path("refused-src.sock");
    let monitor = format!("path={}", events_file.display());
    let mut src = run_tiny(&LONG_COUNT, &["--event-monitor", &monitor], &sock);
    src.wait_line(LIMIT, |l| count_line(l).is_some());
    let (s, failed) = http(
        &sock,
        "PUT",
        "vm.send-migration",
        Some(json!({ "destination_url": url })),
    );
    assert_eq!((s, &failed["code"]), (424, &json!("refused")), "{failed}");
    assert!(
        failed["message"].as_str().unwrap().contains("max-memory"),
        "{failed}"
    );
    // Options ferry does not do are refused before anything moves, naming the field.
    for (field, value) in [
        ("preserve_source", json!(true)),
        ("connections", json!(4)),
        ("timeout_strategy", json!("Ignore")),
        ("local", json!(true)),
    ] {
        let mut body = json!({ "destination_url": url });
        body[field] = value;
        let (s, refused) = http(&sock, "PUT", "vm.send-migration", Some(body));
        assert_eq!(
            (s, &refused["code"]),
            (400, &json!("bad-request")),
            "{refused}"
        );
        assert!(
            refused["message"].as_str().unwrap().contains(field),
            "{refused}"
        );
    }
    src.still_counting(LIMIT, 5);
    let (_, counters) = http(&sock, "GET", "vm.counters", None);
    assert_eq!(counters["migration"]["failed"], 1, "{counters}");
    assert_eq!(counters["migration"]["started"], 1, "{counters}");
    let ev = events(&events_file);
    let failed_event = ev.iter().find(|(_, e, _)| e == "migration-failed");
    let (_, _, props) = failed_event.unwrap_or_else(|| panic!("{:?}", names(&ev)));
    assert_eq!(props["code"], "refused", "{props}");
}
