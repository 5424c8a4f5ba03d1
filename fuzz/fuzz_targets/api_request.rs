//! The control socket's requests (vmm::api): a connection's bytes cut into lines as
//! api::server cuts them (at most MAX_REQUEST bytes before the newline; a longer line is
//! refused and ends the connection), each line parsed by api::wire::parse_request as the
//! server parses it; the same lines read as answers by a client (wire::parse_line). Checks:
//! no panic; a request that parses writes back as JSON that parses again as the same
//! command (the same request where no float is in it); a refusal becomes one answer line
//! of JSON that a client reads back as the same failure; a migration's URL parses or is
//! refused.
#![no_main]

use std::io::{BufRead, Read};

use libfuzzer_sys::fuzz_target;
use vmm::api::wire::{self, Answer, Failure, Incoming, Request};
use vmm::api::MAX_REQUEST;

fn check_request(req: &Request) {
    let json = serde_json::to_vec(req).expect("a request encodes");
    let again = match wire::parse_request(&json) {
        Ok(r) => r,
        Err(e) => panic!("{req:?} written back does not parse: {e}"),
    };
    assert_eq!(
        std::mem::discriminant(req),
        std::mem::discriminant(&again),
        "{req:?}"
    );
    let floats = matches!(req, Request::Migrate(m)
        if m.max_downtime_ms.is_some() || m.timeout_ms.is_some() || m.peer_timeout_ms.is_some());
    assert!(floats || again == *req, "{req:?} reads back as {again:?}");
    if let Request::Migrate(m) = req {
        let _ = m.url.parse::<vmm::migrate::Address>();
    }
}

fn check_refusal(error: String) {
    let refused = Failure::new(wire::Code::BadRequest, error);
    let line = wire::answer_line(&Answer::Failure(refused.clone()));
    assert!(
        !line.contains('\n'),
        "an answer of more than one line: {line}"
    );
    match wire::parse_line::<wire::Status>(&line) {
        Ok(Incoming::Answer(a)) => assert_eq!(*a, Err(refused)),
        other => panic!("{line} reads back as {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut reader = data.take(u64::MAX);
    loop {
        let mut line = Vec::new();
        reader.set_limit(MAX_REQUEST as u64 + 1);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_REQUEST {
            return;
        }
        match wire::parse_request(&line) {
            Ok(req) => check_request(&req),
            Err(e) => check_refusal(e),
        }
        if let Ok(text) = std::str::from_utf8(&line) {
            let _ = wire::parse_line::<wire::Status>(text);
            let _ = wire::parse_line::<wire::Migrated>(text);
        }
    }
});
