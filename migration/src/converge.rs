//! When a precopy migration switches over: a pure function of what the sender measured.
//!
//! After each round the sender knows how many bytes the guest dirtied while the round was
//! sent (the next round's work), how fast the connection moved bytes, and how long it has
//! been going. Rules, in order:
//! 1. predicted downtime = (dirty bytes + state bytes) / bandwidth; if it fits the target,
//!    switch over (pause, send the rest and the state), unless the last round at least
//!    halved the dirty set and the prediction is still over [`GOOD_ENOUGH`]: then another
//!    round (it takes about the downtime it is expected to save, at least half of it) while
//!    less than half the timeout has passed;
//! 2. past the timeout, cancel (the guest stays on the source);
//! 3. if the guest dirtied more than half of what the last round sent (the dirty set is not
//!    shrinking fast enough to converge), throttle the vCPUs: 20 % the first time, then
//!    10 points more each round, up to [`Target::max_throttle`];
//! 4. otherwise another round.

use std::time::Duration;

/// First throttle step, percent of vCPU time taken away.
pub const THROTTLE_INITIAL: u8 = 20;
/// Each further step.
pub const THROTTLE_STEP: u8 = 10;
/// A predicted downtime below which another round is not worth it.
pub const GOOD_ENOUGH: Duration = Duration::from_millis(1);
/// Bandwidth assumed before any has been measured, bytes per second.
pub const DEFAULT_BANDWIDTH: f64 = 1e9;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub max_downtime: Duration,
    pub timeout: Duration,
    /// Most vCPU time throttling may take away, percent (0 = never throttle).
    pub max_throttle: u8,
}

/// What the sender measured up to the end of a round.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observed {
    /// Since the migration started.
    pub elapsed: Duration,
    /// Rounds sent so far (round 0 is the first pass over all of RAM).
    pub rounds: u32,
    /// Bytes the last round put on the wire.
    pub last_round_bytes: u64,
    /// Bytes of guest RAM dirtied while the last round was sent: what is left to send.
    pub dirty_bytes: u64,
    /// The device and vCPU state sent at switchover, estimated.
    pub state_bytes: u64,
    /// Measured bytes per second while sending (0 when not measured yet).
    pub bandwidth: f64,
    /// The throttle now applied, percent.
    pub throttle: u8,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Switchover,
    Continue,
    /// Set the throttle to this percent and continue.
    Throttle(u8),
    Cancel(Stuck),
}

/// Why precopy gives up: the timeout passed with the predicted downtime still over target.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("timed out after {:.1} s and {rounds} rounds: predicted downtime {:.1} ms is still over the {:.1} ms target (throttle {throttle}%)", .elapsed.as_secs_f64(), .predicted.as_secs_f64() * 1e3, .max_downtime.as_secs_f64() * 1e3)]
pub struct Stuck {
    pub elapsed: Duration,
    pub rounds: u32,
    pub predicted: Duration,
    pub max_downtime: Duration,
    pub throttle: u8,
}

/// The downtime to expect if the sender paused now.
pub fn predicted_downtime(o: &Observed) -> Duration {
    let bw = if o.bandwidth > 0.0 {
        o.bandwidth
    } else {
        DEFAULT_BANDWIDTH
    };
    Duration::from_secs_f64((o.dirty_bytes + o.state_bytes) as f64 / bw)
}

/// The next step after a round.
pub fn decide(t: &Target, o: &Observed) -> Decision {
    let predicted = predicted_downtime(o);
    let halving = o.dirty_bytes * 2 <= o.last_round_bytes;
    if predicted <= t.max_downtime {
        if halving && predicted > GOOD_ENOUGH && o.elapsed < t.timeout / 2 {
            return Decision::Continue;
        }
        return Decision::Switchover;
    }
    if o.elapsed >= t.timeout {
        return Decision::Cancel(Stuck {
            elapsed: o.elapsed,
            rounds: o.rounds,
            predicted,
            max_downtime: t.max_downtime,
            throttle: o.throttle,
        });
    }
    // Round 0 copies all of RAM and says nothing about convergence.
    let not_shrinking = o.rounds >= 2 && o.dirty_bytes * 2 > o.last_round_bytes;
    if not_shrinking && o.throttle < t.max_throttle {
        let next = if o.throttle == 0 {
            THROTTLE_INITIAL
        } else {
            o.throttle.saturating_add(THROTTLE_STEP)
        };
        return Decision::Throttle(next.min(t.max_throttle));
    }
    Decision::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn target(ms: u64) -> Target {
        Target {
            max_downtime: Duration::from_millis(ms),
            timeout: Duration::from_secs(10),
            max_throttle: 99,
        }
    }

    fn obs(dirty: u64, last: u64, rounds: u32, throttle: u8) -> Observed {
        Observed {
            elapsed: Duration::from_secs(1),
            rounds,
            last_round_bytes: last,
            dirty_bytes: dirty,
            state_bytes: 20_000,
            bandwidth: 1e9,
            throttle,
        }
    }

    #[test]
    fn switches_over_when_the_rest_fits_the_target() {
        // 4 MB at 1 GB/s = 4 ms (+0.02 ms of state), after a round that sent 6 MB.
        assert_eq!(
            decide(&target(5), &obs(4_000_000, 6_000_000, 2, 0)),
            Decision::Switchover
        );
        assert_eq!(
            decide(&target(3), &obs(4_000_000, 6_000_000, 1, 0)),
            Decision::Continue
        );
        let p = predicted_downtime(&obs(4_000_000, 0, 1, 0));
        assert!((p.as_secs_f64() - 0.00402).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn throttles_step_by_step_when_the_dirty_set_does_not_shrink() {
        let t = target(1);
        // Round 1 alone never throttles; from round 2 on, dirtying > half of what was sent does.
        assert_eq!(
            decide(&t, &obs(16 << 20, 16 << 20, 1, 0)),
            Decision::Continue
        );
        assert_eq!(
            decide(&t, &obs(16 << 20, 16 << 20, 2, 0)),
            Decision::Throttle(20)
        );
        assert_eq!(
            decide(&t, &obs(16 << 20, 16 << 20, 3, 20)),
            Decision::Throttle(30)
        );
        assert_eq!(
            decide(&t, &obs(16 << 20, 16 << 20, 9, 95)),
            Decision::Throttle(99)
        );
        assert_eq!(
            decide(&t, &obs(16 << 20, 16 << 20, 10, 99)),
            Decision::Continue
        );
        // Shrinking well: no throttle.
        assert_eq!(
            decide(&t, &obs(4 << 20, 16 << 20, 3, 0)),
            Decision::Continue
        );
        // Throttling disabled.
        let t0 = Target {
            max_throttle: 0,
            ..t
        };
        assert_eq!(
            decide(&t0, &obs(16 << 20, 16 << 20, 5, 0)),
            Decision::Continue
        );
    }

    #[test]
    fn cancels_at_the_timeout_unless_it_can_switch_over() {
        let t = target(1);
        let mut o = obs(16 << 20, 16 << 20, 30, 99);
        o.elapsed = Duration::from_secs(10);
        match decide(&t, &o) {
            Decision::Cancel(stuck) => {
                assert_eq!((stuck.rounds, stuck.throttle), (30, 99));
                let why = stuck.to_string();
                assert!(why.contains("timed out") && why.contains("99%"), "{why}")
            }
            d => panic!("{d:?}"),
        }
        o.dirty_bytes = 0;
        assert_eq!(decide(&t, &o), Decision::Switchover);
    }

    #[test]
    fn a_halving_dirty_set_gets_more_rounds_until_good_enough() {
        let t = target(20);
        // 4 ms predicted, the last round sent 1 GiB: another round should bring it under 2 ms.
        assert_eq!(
            decide(&t, &obs(4_000_000, 1 << 30, 1, 0)),
            Decision::Continue
        );
        // Under 1 ms: switch over.
        assert_eq!(
            decide(&t, &obs(900_000, 4_000_000, 2, 0)),
            Decision::Switchover
        );
        // Not halving any more: switch over at once.
        assert_eq!(
            decide(&t, &obs(3_000_000, 4_000_000, 2, 0)),
            Decision::Switchover
        );
        // Past half the timeout: no more extra rounds.
        let mut o = obs(4_000_000, 1 << 30, 1, 0);
        o.elapsed = Duration::from_secs(6);
        assert_eq!(decide(&t, &o), Decision::Switchover);
    }

    #[test]
    fn a_zero_target_never_switches_over() {
        let o = obs(0, 0, 3, 0);
        assert_ne!(decide(&target(0), &o), Decision::Switchover);
    }

    #[test]
    fn unmeasured_bandwidth_uses_the_default() {
        let mut o = obs(1_000_000, 0, 0, 0);
        o.bandwidth = 0.0;
        o.state_bytes = 0;
        assert_eq!(predicted_downtime(&o), MS);
    }
}
