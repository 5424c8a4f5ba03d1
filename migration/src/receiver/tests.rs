//! Every transition of the receiver: the legal paths end to end ,
//! and each state against every kind of input it must refuse.

use super::*;
use crate::protocol::Hello;

const NS: [u8; 32] = [3; 32];

fn hello() -> Message {
    Message::Hello(Hello::new(64 << 20, 1, "{}".into(), None))
}

fn ok(r: &mut Receiver, i: Input) -> Action {
    r.step(i.clone())
        .unwrap_or_else(|f| panic!("{i:?} in {:?}: {f:?}", r.state()))
}

fn msg(m: Message) -> Input {
    Input::Message(m)
}

/// A receiver driven to `target` along the legal path (no key).
fn at(target: &str) -> Receiver {
    let mut r = Receiver::new();
    let path: Vec<Input> = vec![
        msg(hello()),
        Input::Done(Ok(())),
        Input::Pages { round: 0 },
        msg(Message::Sync),
        Input::Done(Ok(())),
        msg(Message::State),
        Input::Done(Ok(())),
        msg(Message::Commit),
        Input::Done(Ok(())),
    ];
    let stops = [
        "Handshake",
        "Checking",
        "Accepted",
        "Precopy",
        "Syncing",
        "Precopy1",
        "DeviceState",
        "AwaitCommit",
        "Starting",
        "Running",
    ];
    for (stop, input) in stops.iter().zip(path) {
        if *stop == target {
            return r;
        }
        ok(&mut r, input);
    }
    assert_eq!(target, "Running");
    r
}

#[test]
fn the_whole_path_without_a_key() {
    let mut r = Receiver::new();
    assert_eq!(r.phase(), Phase::Handshake);
    assert!(matches!(ok(&mut r, msg(hello())), Action::CheckHello(_)));
    assert_eq!(ok(&mut r, Input::Done(Ok(()))), Action::Accept);
    assert!(r.in_precopy());
    assert_eq!(
        ok(&mut r, msg(Message::Touched(vec![1, 2]))),
        Action::Readahead(vec![1, 2])
    );
    assert_eq!(ok(&mut r, Input::Pages { round: 0 }), Action::WritePages);
    assert_eq!(ok(&mut r, msg(Message::Sync)), Action::Sync);
    assert!(!r.in_precopy(), "waiting for the sync's outcome");
    assert_eq!(
        ok(&mut r, Input::Done(Ok(()))),
        Action::Reply(Message::Synced)
    );
    assert_eq!(ok(&mut r, Input::Pages { round: 1 }), Action::WritePages);
    assert_eq!(r.phase(), Phase::Memory { round: 1 });
    assert_eq!(ok(&mut r, msg(Message::State)), Action::LoadState);
    assert_eq!(r.phase(), Phase::Switchover);
    assert_eq!(
        ok(&mut r, Input::Done(Ok(()))),
        Action::Reply(Message::Restored)
    );
    assert_eq!(r.phase(), Phase::AwaitCommit);
    assert_eq!(ok(&mut r, msg(Message::Commit)), Action::Start);
    assert_eq!(ok(&mut r, Input::Done(Ok(()))), Action::Running);
    assert_eq!(r.state(), &State::Running);
    let after = r.step(msg(Message::Commit)).unwrap_err();
    assert_eq!(after.error, Error::Ended);
}

#[test]
fn a_challenge_is_refused_and_told() {
    // Authentication happens before the receiver (vmm's migrate::tls): a challenge here
    // is a source that expects a key this destination does not have.
    let mut r = Receiver::new();
    let f = r.step(msg(Message::AuthChallenge(NS))).unwrap_err();
    assert!(matches!(&f.error, Error::NoKey), "{f:?}");
    assert!(
        matches!(f.reply.as_deref(), Some(Message::Refuse(_))),
        "{f:?}"
    );
}

#[test]
fn a_hello_this_host_cannot_take_is_refused_with_the_reason() {
    let mut r = at("Checking");
    let f = r
        .step(Input::Done(Err("missing ssse3".to_string())))
        .unwrap_err();
    assert_eq!(
        f.reply.as_deref(),
        Some(&Message::Refuse("missing ssse3".into()))
    );
}

#[test]
fn touched_only_before_the_first_sync() {
    let mut r = at("Precopy1");
    let f = r.step(msg(Message::Touched(vec![0]))).unwrap_err();
    assert!(
        matches!(
            f.error,
            Error::Unexpected {
                got: "Touched",
                phase: Phase::Memory { round: 0 },
                ..
            }
        ),
        "{f:?}"
    );
}

#[test]
fn our_failures_are_told_to_the_source() {
    for (state, what) in [
        ("Syncing", "building the VM"),
        ("DeviceState", "restoring"),
        ("Starting", "starting"),
    ] {
        let mut r = at(state);
        let f = r.step(Input::Done(Err(what.to_string()))).unwrap_err();
        assert_eq!(
            f.reply.as_deref(),
            Some(&Message::Failed(what.into())),
            "{state}"
        );
        assert_eq!(f.error, Error::Failed(what.into()));
    }
}

#[test]
fn a_cancel_ends_any_precopy_state() {
    for state in ["Accepted", "Precopy", "Precopy1"] {
        let mut r = at(state);
        let f = r
            .step(msg(Message::Cancel("timed out".into())))
            .unwrap_err();
        assert_eq!(
            f.error,
            Error::CancelledBySource("timed out".into()),
            "{state}"
        );
        assert_eq!(f.reply, None);
    }
}

/// Every kind of input, one of each.
fn every_input() -> Vec<Input> {
    vec![
        msg(hello()),
        msg(Message::Accept),
        msg(Message::Refuse("r".into())),
        msg(Message::Restored),
        msg(Message::Failed("f".into())),
        msg(Message::Commit),
        msg(Message::Running),
        msg(Message::Cancel("c".into())),
        msg(Message::State),
        msg(Message::Sync),
        msg(Message::Touched(vec![])),
        msg(Message::Synced),
        msg(Message::AuthChallenge(NS)),
        msg(Message::AuthResponse(NS, NS)),
        msg(Message::AuthProof(NS)),
        msg(Message::Missing {
            first_page: 0,
            words: vec![1],
        }),
        msg(Message::PageRequest(vec![(0, 1)])),
        msg(Message::PostcopyDone),
        Input::Pages { round: 0 },
        Input::Done(Ok(())),
    ]
}

/// The inputs each state (reached by the legal path) takes: all others end it.
#[test]
fn every_state_refuses_every_input_it_does_not_take() {
    let takes: &[(&str, &[&str])] = &[
        ("Handshake", &["Hello"]),
        ("Checking", &["an outcome"]),
        (
            "Accepted",
            &["Pages", "Sync", "Touched", "Missing", "Cancel", "State"],
        ),
        (
            "Precopy",
            &["Pages", "Sync", "Touched", "Missing", "Cancel", "State"],
        ),
        ("Syncing", &["an outcome"]),
        ("Precopy1", &["Pages", "Sync", "Missing", "Cancel", "State"]),
        ("DeviceState", &["an outcome"]),
        ("AwaitCommit", &["Commit"]),
        ("Starting", &["an outcome"]),
        ("Running", &[]),
    ];
    let mut checked = 0;
    for (state, taken) in takes {
        for input in every_input() {
            let mut r = at(state);
            let result = r.step(input.clone());
            // A Cancel is taken in precopy states, as the end.
            let cancel_ends = name(&input) == "Cancel" && taken.contains(&"Cancel");
            if taken.contains(&name(&input)) && !cancel_ends {
                assert!(result.is_ok(), "{state} must take {input:?}: {result:?}");
            } else {
                assert!(result.is_err(), "{state} must refuse {input:?}: {result:?}");
                assert_eq!(r.state(), &State::Failed, "{state} after {input:?}");
                assert!(
                    r.step(Input::<String>::Done(Ok(()))).is_err(),
                    "failed is final"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, takes.len() * every_input().len());
}
