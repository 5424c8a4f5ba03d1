//! The driver's logic that needs no KVM: what it holds stage by stage, its typed failures,
//! and what it tells the source.

use std::io::Cursor;

use migration::protocol::{Hello, Message};
use migration::receiver::{Action, Input, Receiver};

use super::*;
use crate::codes::Code;
use crate::guest_cpu::admission::Refusal;

type Start = fn(&Vm) -> Result<(), crate::vm::Error>;

fn hello(memory: u64, vcpus: u32) -> Hello {
    Hello {
        format_version: migration::limits::FORMAT_VERSION,
        memory,
        vcpus,
        cpu_profile: String::new(),
        guest_cpu: None,
        devices: Vec::new(),
    }
}

/// What the driver wrote to the source, as messages.
fn told(conn: Cursor<Vec<u8>>) -> Vec<Message> {
    let mut wire = Cursor::new(conn.into_inner());
    let mut out = Vec::new();
    while let Ok(m) = protocol::recv(&mut wire) {
        out.push(m);
    }
    out
}

#[test]
fn a_hello_over_the_limits_is_refused_before_the_host_is_asked() {
    let mut conn = Cursor::new(Vec::new());
    let mut d = Driver::new(&mut conn, Box::new(std::io::sink()));
    let mut opts = ReceiveOptions {
        max_memory: 1 << 30,
        max_vcpus: 2,
        ..Default::default()
    };
    let mut start: Option<Start> = None;
    for (h, code) in [
        (hello(8 << 30, 1), "TooMuchMemory"),
        (hello(1 << 20, 3), "TooManyVcpus"),
    ] {
        let step = d.act(
            Action::CheckHello(Box::new(h)),
            Phase::Handshake,
            &mut opts,
            &mut start,
        );
        let Ok(Step::Go(Some(Input::Done(Err(e))))) = step else {
            panic!("{code}: not a refusal");
        };
        assert_eq!(e.code(), Code::RefusedPolicy, "{e}");
        assert!(format!("{e:?}").starts_with(code), "{e:?}");
    }
    assert!(matches!(d.held, Held::Waiting(_)), "nothing taken");
}

#[test]
fn steps_out_of_turn_are_typed_failures() {
    let mut conn = Cursor::new(Vec::new());
    let mut d = Driver::new(&mut conn, Box::new(std::io::sink()));
    let mut opts = ReceiveOptions::default();
    let mut start: Option<Start> = None;
    let out_of_turn =
        |e: &Error| matches!(e, Error::FailedHere(h) if matches!(**h, Here::OutOfTurn(_)));
    for action in [
        Action::Accept,
        Action::WritePages,
        Action::Readahead(vec![0]),
    ] {
        let e = match d.act(action, Phase::Handshake, &mut opts, &mut start) {
            Err(e) => e,
            Ok(_) => panic!("a step out of turn went on"),
        };
        assert!(out_of_turn(&e), "{e}");
        assert_eq!(e.code(), Code::Internal);
    }
    for action in [Action::Sync, Action::LoadState, Action::Start] {
        let step = d.act(action, Phase::Handshake, &mut opts, &mut start);
        let Ok(Step::Go(Some(Input::Done(Err(Here::OutOfTurn(_)))))) = step else {
            panic!("a step out of turn went on");
        };
    }
    let Err(e) = d.postcopy_then_vm() else {
        panic!("no VM to hand over, yet one came");
    };
    assert!(out_of_turn(&e), "{e}");
}

#[test]
fn a_refusal_is_told_to_the_source_and_keeps_its_kind() {
    let mut conn = Cursor::new(Vec::new());
    let mut d = Driver::new(&mut conn, Box::new(std::io::sink()));
    let mut rx = Receiver::new();
    let checking = rx.step::<Here>(Input::Message(Message::Hello(hello(1 << 30, 1))));
    assert!(matches!(checking, Ok(Action::CheckHello(_))));
    let refusal = Refusal::OtherCpu(vec!["leaf 0x1 eax: 0x906ea here, 0xa0f11 saved".into()]);
    let words = refusal.to_string();
    let f = rx.step(Input::Done(Err(Here::Cpu(refusal)))).unwrap_err();
    let e = d.fail(f);
    assert!(
        matches!(&e, Error::RefusedHere(h) if matches!(**h, Here::Cpu(_))),
        "{e}"
    );
    assert_eq!(e.code(), Code::RefusedCpu);
    assert_eq!(e.to_string(), format!("refused: {words}"));
    assert_eq!(told(conn), vec![Message::Refuse(words)]);
}

#[test]
fn missing_pages_outside_ram_fail_and_are_told() {
    let mut conn = Cursor::new(Vec::new());
    let mut d = Driver::new(&mut conn, Box::new(std::io::sink()));
    let ram = crate::memory::GuestRam::new(2 << 20).unwrap();
    d.held = Held::Guest(Box::new(Guest {
        hello: Box::new(hello(2 << 20, 1)),
        mem: ram.memory().clone(),
        regions: ram.regions(),
        machine: Machine::Lost,
        readahead: None,
        postcopy: Postcopy::Off,
    }));
    // Page 1 is RAM; page 512 (2 MiB) is past its end.
    d.missing(0, &[0b10]).unwrap();
    let e = d.missing(512, &[1]).unwrap_err();
    assert!(
        matches!(&e, Error::FailedHere(h) if matches!(**h, Here::MissingOutsideRam(0x200000))),
        "{e}"
    );
    assert_eq!(e.code(), Code::Protocol);
    let Held::Guest(g) = &d.held else {
        panic!("the guest was dropped")
    };
    assert!(matches!(&g.postcopy, Postcopy::Named(m) if m.total == 1));
    let Err(e) = d.postcopy_then_vm() else {
        panic!("the machine was lost, yet a VM came");
    };
    assert!(
        matches!(&e, Error::FailedHere(h) if matches!(**h, Here::OutOfTurn(_))),
        "{e}"
    );
    let said = told(conn);
    assert_eq!(said.len(), 1);
    assert!(
        matches!(&said[0], Message::Failed(w) if w.contains("0x200000")),
        "{said:?}"
    );
}
