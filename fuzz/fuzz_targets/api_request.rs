//! The control socket's HTTP requests (vmm::api): a connection's bytes read as requests as
//! api::server reads them (api::http::Reader, bodies of at most MAX_REQUEST bytes), each
//! routed as the server routes it (api::routes::route); the same bytes read as responses
//! as `ferry ctl` reads them. Checks: no panic, no unbounded allocation; a request that
//! routes goes out again (routes::to_http) and routes back to the same request (the same
//! kind where a float is in it); a refusal has a 4xx status and a body that reads back as
//! the same failure; a refused message's status is a 4xx.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::http::{ReadError, Reader};
use vmm::api::routes::{self, Routed};
use vmm::api::wire::{Failure, Request};
use vmm::api::MAX_REQUEST;

fn check_request(req: &Request) {
    let (method, path, body) = routes::to_http(req);
    let again = match routes::route(method, &path, body.as_deref().unwrap_or_default()) {
        Ok(Routed::Request(r)) => r,
        other => panic!("{req:?} sent again routes as {other:?}"),
    };
    assert_eq!(
        std::mem::discriminant(req),
        std::mem::discriminant(&again),
        "{req:?}"
    );
    let floats = matches!(req, Request::Migrate(m)
        if m.max_downtime_ms.is_some() || m.timeout_ms.is_some() || m.peer_timeout_ms.is_some());
    assert!(floats || again == *req, "{req:?} routes back as {again:?}");
}

fn check_refusal(r: routes::Refusal) {
    assert!((400..500).contains(&r.status), "{r:?}");
    let body = r.body();
    let back: Failure = serde_json::from_slice(&body).expect("a refusal's body reads back");
    assert_eq!((back.code, back.message), (r.code, r.message));
}

fuzz_target!(|data: &[u8]| {
    let mut reader = Reader::default();
    let mut input = data;
    let mut sink = Vec::new();
    loop {
        match reader.request(&mut input, &mut sink, MAX_REQUEST) {
            Ok(req) => {
                assert!(req.body.len() <= MAX_REQUEST);
                match routes::route(&req.method, &req.path, &req.body) {
                    Ok(Routed::Request(r)) => check_request(&r),
                    Ok(Routed::Openapi) => {}
                    Err(refusal) => check_refusal(refusal),
                }
            }
            Err(ReadError::Malformed { status, .. }) => {
                assert!((400..500).contains(&status), "{status}");
                break;
            }
            Err(ReadError::Closed { .. } | ReadError::Io(_)) => break,
        }
    }
    let mut client = Reader::default();
    let mut input = data;
    while let Ok(r) = client.response(&mut input, 1 << 20) {
        assert!(r.body.len() <= 1 << 20);
    }
});
