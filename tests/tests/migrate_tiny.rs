//! Live migration of the heavy ring-3 dirtier (tests/tiny/long_storm.S) inside one process,
//! over a socket pair: the destination's memory equals the source's at switchover, also for
//! a guest paused before the migration (its pages sent from where they lie); a target
//! that cannot be met is throttled, then met or cancelled with the guest running on, and the
//! report says which; a cancel in the middle of a round leaves the guest on the source; a
//! guest that dirties a page per round converges over a link with latency.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use ferry_tests::tiny::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::migrate::{self, Options, Report};
use vmm::Vm;

const LIMIT: Duration = Duration::from_secs(60);
/// The guest's status: passes done, bad pages seen.
const STATUS: u64 = 0x80_0000;
/// Its working set: 4096 pages.
const BUF: u64 = 0x100_0000;
const PAGES: u64 = 4096;

fn status(vm: &Vm) -> (u64, u64) {
    let m = vm.memory();
    (
        m.read_obj(GuestAddress(STATUS)).unwrap(),
        m.read_obj(GuestAddress(STATUS + 8)).unwrap(),
    )
}

/// A paused storm guest's memory is consistent: no bad page seen, and the working set holds
/// pass + 1 up to some page and pass from there (the guest may have stopped mid-pass).
fn check_consistent(vm: &Vm) -> u64 {
    let (pass, bad) = status(vm);
    assert_eq!(
        bad, 0,
        "the guest saw pages that did not hold its last store"
    );
    assert!(pass > 0, "the guest has run");
    let values: Vec<u64> = (0..PAGES)
        .map(|i| vm.memory().read_obj(GuestAddress(BUF + i * 4096)).unwrap())
        .collect();
    let done = values.iter().take_while(|v| **v == pass + 1).count();
    assert!(
        values[done..].iter().all(|v| *v == pass),
        "pass {pass}: pages 0..{done} hold {}, then {:?}",
        pass + 1,
        &values[done..done + 4.min(values.len() - done)]
    );
    pass
}

fn storm() -> TinyVm {
    let t = TinyVm::new(&LONG_STORM, 1);
    t.vm.start().unwrap();
    wait_for("the storm guest to run", LIMIT, || status(&t.vm).0 >= 20);
    t
}

/// Migrates `src` over a socket pair to a new VM made on another thread.
fn migrate(
    src: &Vm,
    control: &migrate::Control,
    opts: Options,
    on_progress: &mut dyn FnMut(&migrate::Progress),
) -> (Result<Report, migrate::Error>, Result<Vm, migrate::Error>) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(LIMIT)).unwrap();
    }
    let dest =
        std::thread::spawn(move || migrate::receive_over(b, None, Box::new(Console::default())));
    let sent = migrate::send_over(src, control, a, &opts, on_progress);
    (sent, dest.join().expect("the receiving thread"))
}

/// Every byte of guest RAM of two paused VMs is equal.
fn assert_same_memory(a: &Vm, b: &Vm) {
    assert_eq!(a.ram().regions(), b.ram().regions());
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    for (start, len) in a.ram().regions() {
        for off in (0..len).step_by(x.len()) {
            a.memory()
                .read_slice(&mut x, GuestAddress(start + off))
                .unwrap();
            b.memory()
                .read_slice(&mut y, GuestAddress(start + off))
                .unwrap();
            assert!(x == y, "guest RAM differs in the MiB at {:#x}", start + off);
        }
    }
}

/// The guest goes on where it is: its pass count grows, it sees no bad page.
fn assert_runs_on(vm: &Vm) {
    let before = status(vm).0;
    wait_for("the guest to go on", LIMIT, || status(vm).0 >= before + 5);
    vm.pause().unwrap();
    check_consistent(vm);
    vm.resume().unwrap();
}

fn assert_cancelled_here(src: &mut TinyVm, sent: Result<Report, migrate::Error>) -> Report {
    let report = match sent {
        Err(migrate::Error::Cancelled { report, .. }) => *report,
        other => panic!("expected a cancelled migration, got {other:?}"),
    };
    assert_eq!(report.outcome, migrate::Outcome::Cancelled);
    assert_eq!(
        src.vm.state(),
        vmm::RunState::Running,
        "the guest runs here"
    );
    assert!(!src.vm.ram().dirty_logging(), "dirty logging is off again");
    assert_runs_on(&src.vm);
    report
}

#[test]
fn the_destination_memory_equals_the_source_at_switchover() {
    let src = storm();
    let mut updates = 0;
    let (sent, received) = migrate(
        &src.vm,
        &Default::default(),
        Options::default(),
        &mut |_| updates += 1,
    );
    let report = sent.expect("the migration completes");
    let dest = received.expect("the destination has the VM");
    eprintln!("{report:?}");
    assert_eq!(report.outcome, migrate::Outcome::Completed);
    assert!(report.rounds >= 2, "round 0 and the last round at least");
    assert_eq!(report.pages_per_round.len() as u32, report.rounds);
    assert!(
        report.untouched_pages > 0,
        "most of the 64 MiB was never touched"
    );
    assert!(report.downtime_ms > 0.0 && report.downtime_ms <= report.total_ms);
    // Both paused: the same machine, byte for byte.
    assert_eq!(src.vm.state(), vmm::RunState::Paused);
    assert_same_memory(&src.vm, &dest);
    let at_switchover = check_consistent(&dest);
    dest.start().unwrap();
    assert_runs_on(&dest);
    assert!(status(&dest).0 > at_switchover);
}

#[test]
fn a_guest_paused_before_the_migration_moves_byte_for_byte_and_stays_paused_here() {
    // Every round of a paused guest sends its pages from where they lie, not copied.
    let src = storm();
    src.vm.pause().unwrap();
    let pass = check_consistent(&src.vm);
    let (sent, received) = migrate(
        &src.vm,
        &Default::default(),
        Options::default(),
        &mut |_| {},
    );
    let report = sent.expect("the migration completes");
    let dest = received.expect("the destination has the VM");
    assert_eq!(report.outcome, migrate::Outcome::Completed);
    assert!(
        report.pages_per_round[0] >= PAGES,
        "round 0 sent the working set: {:?}",
        report.pages_per_round
    );
    assert_eq!(
        report.pages_per_round[1..].iter().sum::<u64>(),
        0,
        "a paused guest dirties nothing after round 0"
    );
    assert_eq!(src.vm.state(), vmm::RunState::Paused);
    assert_same_memory(&src.vm, &dest);
    assert_eq!(check_consistent(&dest), pass);
    dest.start().unwrap();
    assert_runs_on(&dest);
    assert!(status(&dest).0 > pass);
}

#[test]
fn an_unreachable_target_is_throttled_then_cancelled_and_the_guest_runs_on() {
    let mut src = storm();
    // Paced so that the guest rewrites its working set during every round (see below).
    let opts = Options {
        max_downtime: Duration::ZERO,
        timeout: Duration::from_secs(3),
        max_bandwidth: Some(50_000_000),
        ..Options::default()
    };
    let (sent, received) = migrate(&src.vm, &Default::default(), opts, &mut |_| {});
    let report = assert_cancelled_here(&mut src, sent);
    eprintln!("{report:?}");
    assert!(report.throttle_pct > 0, "{report:?}");
    assert!(
        report.reason.as_deref().unwrap_or("").contains("timed out"),
        "{report:?}"
    );
    match received {
        Err(migrate::Error::CancelledBySource(why)) => assert!(why.contains("timed out")),
        other => panic!("the destination must end: {other:?}"),
    }
}

#[test]
fn a_tight_target_is_met_by_throttling_or_cancelled_and_the_report_says_which() {
    let mut src = storm();
    // Paced to 50 MB/s, a round of the 16 MiB working set takes about 330 ms, in which the
    // guest rewrites all of it: only throttling can bring the rest under 1 ms.
    let opts = Options {
        max_downtime: Duration::from_millis(1),
        timeout: Duration::from_secs(20),
        max_bandwidth: Some(50_000_000),
        ..Options::default()
    };
    let (sent, received) = migrate(&src.vm, &Default::default(), opts, &mut |_| {});
    match sent {
        Ok(report) => {
            eprintln!("{report:?}");
            assert_eq!(report.outcome, migrate::Outcome::Completed);
            assert!(report.throttle_pct > 0, "the working set needs throttling");
            let dest = received.expect("the destination has the VM");
            assert_same_memory(&src.vm, &dest);
            check_consistent(&dest);
        }
        other => {
            let report = assert_cancelled_here(&mut src, other);
            eprintln!("{report:?}");
            assert!(report.throttle_pct > 0);
            assert!(received.is_err());
        }
    }
}

#[test]
fn a_cancel_in_the_middle_of_a_round_leaves_the_guest_here() {
    let mut src = storm();
    // Paced to 20 MB/s, round 0 (16 MiB and more) takes most of a second: cancel once
    // 2 MiB of it are out.
    let opts = Options {
        max_bandwidth: Some(20_000_000),
        ..Options::default()
    };
    let mut seen = None;
    let vm = &src.vm;
    let control = migrate::Control::default();
    let (sent, received) = migrate(vm, &control, opts, &mut |p| {
        if p.sent_bytes > 2 << 20 && seen.is_none() {
            seen = Some(p.clone());
            assert!(control.cancel());
        }
    });
    let at_cancel = seen.expect("progress during round 0");
    assert_eq!(at_cancel.round, 0);
    assert!(at_cancel.remaining_bytes > 0, "{at_cancel:?}");
    let report = assert_cancelled_here(&mut src, sent);
    assert!(
        report.reason.as_deref().unwrap_or("").contains("cancelled"),
        "{report:?}"
    );
    match received {
        Err(migrate::Error::CancelledBySource(why)) => assert!(why.contains("round 0"), "{why}"),
        other => panic!("the destination must end: {other:?}"),
    }
    assert!(!control.cancel(), "nothing left to cancel");
}

/// A stream whose every flush (the end of each protocol message) takes 50 ms: a link with
/// latency, where a round of a page or two lasts a round trip whatever the bandwidth.
struct Slow(UnixStream);

impl std::io::Read for Slow {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for Slow {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_millis(50));
        self.0.flush()
    }
}

#[test]
fn a_guest_dirtying_a_page_per_round_converges_over_a_link_with_latency() {
    ferry_tests::require_kvm();
    let src = TinyVm::new(&LONG_COUNT, 1);
    src.vm.start().unwrap();
    // tests/tiny/long_count.S keeps its counter at 0x300000.
    let count = |vm: &Vm| -> u64 { vm.memory().read_obj(GuestAddress(0x30_0000)).unwrap() };
    wait_for("the counting guest to count", LIMIT, || {
        count(&src.vm) > 100
    });
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(LIMIT)).unwrap();
    }
    let dest =
        std::thread::spawn(move || migrate::receive_over(b, None, Box::new(Console::default())));
    let opts = Options {
        timeout: Duration::from_secs(10),
        ..Options::default()
    };
    let sent = migrate::send_over(&src.vm, &Default::default(), Slow(a), &opts, &mut |_| {});
    let report = sent.expect(
        "rounds of a page or two last a round trip: they must not make the bandwidth look like \
         a page per round trip, or the migration never switches over",
    );
    eprintln!("over a slow link: {report:?}");
    assert_eq!(report.outcome, migrate::Outcome::Completed);
    let dst = dest
        .join()
        .expect("the receiving thread")
        .expect("received");
    assert_eq!(count(&dst), count(&src.vm), "the counter came along");
    assert!(report.rounds < 100, "it switched over soon: {report:?}");
    assert!(
        report.bandwidth_mbps > 0.0,
        "the report gives the rate the link delivered: {report:?}"
    );
}
