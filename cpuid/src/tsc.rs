//! The guest's TSC rate across hosts: what a host that restores or receives a guest does
//! when the rate the guest ran at is not its own (docs/cpuid.md, "TSC rate").
//!
//! ```text
//! saved rate unknown (format 1) or this host's unknown -> Unknown: run at this host's rate
//! within TOLERANCE_PPM of this host's rate            -> Keep
//! differs, KVM can scale (KVM_CAP_TSC_CONTROL)         -> Scale: KVM_SET_TSC_KHZ per vCPU
//! differs, cannot scale, profile promises invtsc       -> refused (the promise would break)
//! differs, cannot scale, profile offers no kvmclock    -> refused (nothing keeps its time)
//! differs, cannot scale, guest on kvmclock             -> Unscaled: runs at this host's rate,
//!                                                         kvmclock carries its time across
//! ```

/// Rates within this many parts per million of each other are one rate: KVM's own
/// tolerance (`tsc_tolerance_ppm`), within which it does not scale either.
pub const TOLERANCE_PPM: u64 = 250;

/// What this host does with the guest's TSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscPlan {
    /// The rates are one (within [`TOLERANCE_PPM`]): nothing to do.
    Keep,
    /// The guest's rate or this host's is not known (a format version 1 state carries
    /// none): the guest's TSC runs at this host's rate.
    Unknown { host_khz: u32 },
    /// Set the guest's rate with KVM_SET_TSC_KHZ on every vCPU.
    Scale { guest_khz: u32, host_khz: u32 },
    /// This host cannot scale: the guest's TSC runs at `host_khz` from now on, and the guest
    /// keeps time through kvmclock, whose parameters KVM computes for this host.
    Unscaled { guest_khz: u32, host_khz: u32 },
}

/// What the host and the guest's profile offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscHost {
    /// This host's TSC rate as KVM gives it to a new vCPU (0: unknown).
    pub khz: u32,
    /// Whether this host's KVM can run a vCPU at another rate (KVM_CAP_TSC_CONTROL).
    pub can_scale: bool,
}

/// Why a host cannot take a guest's TSC: it ran at another rate, this host's KVM cannot
/// scale it, and the guest has no way to keep time across the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the guest's TSC ran at {guest_khz} kHz; this host's runs at {host_khz} kHz and its KVM cannot scale it (no KVM_CAP_TSC_CONTROL), and the guest's CPU profile promises an invariant TSC (invtsc)")]
    Invariant { guest_khz: u32, host_khz: u32 },
    #[error("the guest's TSC ran at {guest_khz} kHz; this host's runs at {host_khz} kHz and its KVM cannot scale it (no KVM_CAP_TSC_CONTROL), and the guest's CPU profile offers no kvmclock to keep its time by")]
    NoKvmclock { guest_khz: u32, host_khz: u32 },
}

/// Decides what to do with a guest whose TSC ran at `guest_khz` (None or 0: unknown) on
/// `host`, for a profile that promises an invariant TSC (`invtsc`) or not and offers
/// kvmclock or not. Err is why to refuse it.
pub fn plan(
    guest_khz: Option<u32>,
    host: TscHost,
    invtsc: bool,
    kvmclock: bool,
) -> Result<TscPlan, Refusal> {
    let host_khz = host.khz;
    let guest_khz = match guest_khz {
        Some(g) if g != 0 && host_khz != 0 => g,
        _ => return Ok(TscPlan::Unknown { host_khz }),
    };
    let apart = u64::from(guest_khz.abs_diff(host_khz)) * 1_000_000;
    if apart <= TOLERANCE_PPM * u64::from(guest_khz) {
        return Ok(TscPlan::Keep);
    }
    if host.can_scale {
        return Ok(TscPlan::Scale {
            guest_khz,
            host_khz,
        });
    }
    if invtsc {
        return Err(Refusal::Invariant {
            guest_khz,
            host_khz,
        });
    }
    if !kvmclock {
        return Err(Refusal::NoKvmclock {
            guest_khz,
            host_khz,
        });
    }
    Ok(TscPlan::Unscaled {
        guest_khz,
        host_khz,
    })
}

impl TscPlan {
    /// A line for the log, where there is something to say.
    pub fn note(&self) -> Option<String> {
        match *self {
            TscPlan::Keep => None,
            TscPlan::Unknown { host_khz } => Some(format!(
                "the saved state does not say at what rate the guest's TSC ran (format version 1): it runs at this host's {host_khz} kHz"
            )),
            TscPlan::Scale { guest_khz, host_khz } => Some(format!(
                "the guest's TSC runs at its own {guest_khz} kHz, scaled by KVM (this host's rate is {host_khz} kHz)"
            )),
            TscPlan::Unscaled { guest_khz, host_khz } => Some(format!(
                "the guest's TSC ran at {guest_khz} kHz and runs at this host's {host_khz} kHz from now on (this KVM cannot scale it); the guest keeps time through kvmclock"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXED: TscHost = TscHost {
        khz: 2_599_998,
        can_scale: false,
    };
    const SCALING: TscHost = TscHost {
        khz: 2_599_998,
        can_scale: true,
    };

    #[test]
    fn the_same_rate_within_kvms_tolerance_needs_nothing() {
        assert_eq!(plan(Some(2_599_998), FIXED, true, true), Ok(TscPlan::Keep));
        // 250 ppm of 2.6 GHz is 650 kHz.
        assert_eq!(plan(Some(2_600_600), FIXED, true, true), Ok(TscPlan::Keep));
        assert_ne!(plan(Some(2_600_700), FIXED, false, true), Ok(TscPlan::Keep));
    }

    #[test]
    fn an_unknown_rate_runs_at_this_hosts() {
        let unknown = Ok(TscPlan::Unknown {
            host_khz: 2_599_998,
        });
        assert_eq!(plan(None, FIXED, true, true), unknown);
        assert_eq!(plan(Some(0), FIXED, true, false), unknown);
        let no_host = TscHost { khz: 0, ..SCALING };
        assert_eq!(
            plan(Some(2_596_096), no_host, true, true),
            Ok(TscPlan::Unknown { host_khz: 0 })
        );
    }

    #[test]
    fn a_host_that_can_scale_scales() {
        assert_eq!(
            plan(Some(2_596_096), SCALING, true, false),
            Ok(TscPlan::Scale {
                guest_khz: 2_596_096,
                host_khz: 2_599_998
            })
        );
    }

    #[test]
    fn a_host_that_cannot_scale_refuses_an_invariant_tsc_and_a_guest_without_kvmclock() {
        // The AMD EPYC and Intel Xeon hosts of the pool: 2596096 and 2599998 kHz.
        let refused = plan(Some(2_596_096), FIXED, true, true).unwrap_err();
        assert_eq!(
            refused,
            Refusal::Invariant {
                guest_khz: 2_596_096,
                host_khz: 2_599_998
            }
        );
        let e = refused.to_string();
        assert!(
            e.contains("2596096 kHz") && e.contains("2599998 kHz"),
            "{e}"
        );
        assert!(e.contains("invtsc") && !e.contains('\n'), "{e}");
        let e = plan(Some(2_596_096), FIXED, false, false).unwrap_err();
        assert!(matches!(e, Refusal::NoKvmclock { .. }), "{e:?}");
        assert!(e.to_string().contains("kvmclock"), "{e}");
        let p = plan(Some(2_596_096), FIXED, false, true).unwrap();
        assert_eq!(
            p,
            TscPlan::Unscaled {
                guest_khz: 2_596_096,
                host_khz: 2_599_998
            }
        );
        assert!(p.note().unwrap().contains("kvmclock"));
    }
}
