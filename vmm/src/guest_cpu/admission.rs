//! Taking in a guest saved on another host (a snapshot restored, a migration received): the
//! guest CPU as the saving host ran it ([`GuestCpu`]: its TSC rate and the CPUID table that
//! host's KVM held) against what this host's KVM makes of the same profile, before any of
//! the guest's memory is written (docs/cpuid.md, "Moving between hosts").
//!
//! ```text
//! saving host:  Vm::guest_cpu() -> GuestCpu { host vendor/signature, TSC kHz, effective CPUID }
//! this host:    HostView (a vCPU of the profile: KVM_GET_CPUID2, KVM_GET_TSC_KHZ, TSC_CONTROL)
//! admit(saved, profile, here) -> Err(one line: refuse) | Admission { TSC plan, report }
//! Admission::apply(vCPUs): KVM_SET_TSC_KHZ where the plan scales; the report to the log
//! ```

use cpuid::profile::CpuProfile;
use cpuid::tsc::{TscHost, TscPlan};
use cpuid::{CpuidDump, Leaf};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use migration::GuestCpu;

use super::model;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("probing this host's KVM: {0}")]
    Probe(#[from] crate::guest_cpu::model::Error),
}

/// Why this host refuses a saved guest's CPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The profile does not run here at all (another vendor, features missing).
    #[error(transparent)]
    Profile(#[from] model::Refusal),
    /// The guest would see a CPU other than the one it ran on: each difference, in words.
    #[error("the guest would see another CPU on this host: {}", .0.join("; "))]
    OtherCpu(Vec<String>),
    /// Its TSC cannot go on at its rate, and it has no way to keep time across the change.
    #[error(transparent)]
    Tsc(#[from] cpuid::tsc::Refusal),
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// The record a saved guest carries: where it ran and how.
pub fn record(host: &CpuidDump, tsc_khz: u32, effective: &[Leaf]) -> GuestCpu {
    GuestCpu {
        host_vendor: host.vendor_string(),
        host_signature: host.get(1, 0).map(|l| l.eax).unwrap_or(0),
        tsc_khz,
        cpuid: effective.to_vec(),
    }
}

/// "AuthenticAMD family 0x19 model 0x11" for a vendor string and a leaf-1 signature.
pub fn describe_host(vendor: &str, signature: u32) -> String {
    let (family, model, _) = cpuid::leaf::decode_signature(signature);
    format!("{vendor} family {family:#x} model {model:#x}")
}

/// What this host's KVM gives a vCPU of a profile.
#[derive(Debug, Clone)]
pub struct HostView {
    /// vCPU 0's table as KVM holds it after KVM_SET_CPUID2.
    pub effective: Vec<Leaf>,
    pub tsc: TscHost,
}

/// Whether this host runs `profile` at all: the one check that `ferry run`, `restore` and
/// `receive` (before Accept) make. A profile that describes one host (not migratable) runs
/// only on a host of its vendor, and every feature it offers must be here.
pub fn runs_here(profile: &CpuProfile, host: &CpuidDump) -> Result<(), model::Refusal> {
    let name = || migration::protocol::printable(&profile.name);
    if !profile.migratable && host.vendor() != Some(profile.identity.vendor) {
        return Err(model::Refusal::OtherVendor(name()));
    }
    cpuid::profile::check(profile, host).map_err(|missing| model::Refusal::CannotRun {
        name: name(),
        missing,
    })
}

/// A vCPU's TSC rate as KVM gives it, and whether this KVM can change it.
pub fn tsc_host(kvm: &Kvm, fd: &VcpuFd) -> TscHost {
    let khz = if kvm.check_extension(Cap::GetTscKhz) {
        fd.get_tsc_khz().unwrap_or(0)
    } else {
        0
    };
    TscHost {
        khz,
        can_scale: kvm.check_extension(Cap::TscControl),
    }
}

/// What this host's KVM makes of `profile` for a guest of `vcpus` vCPUs, read from a scratch
/// VM with one vCPU (about a millisecond): for a destination that must answer before it
/// builds the machine.
pub fn probe(kvm: &Kvm, profile: &CpuProfile, vcpus: u32) -> Result<HostView, Error> {
    let vm = kvm.create_vm().map_err(self::kvm("KVM_CREATE_VM"))?;
    let fd = vm.create_vcpu(0).map_err(self::kvm("KVM_CREATE_VCPU"))?;
    let table = cpuid::table::guest_table(profile, vcpus);
    let effective = crate::guest_cpu::model::set_cpuid(std::slice::from_ref(&fd), &table)?;
    Ok(HostView {
        effective,
        tsc: tsc_host(kvm, &fd),
    })
}

/// How this host takes the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub tsc: TscPlan,
    /// Differences of the CPUID tables that only an emulating KVM made (for the log).
    pub report: Option<String>,
    /// Where the guest was saved, when the state says.
    pub made_on: Option<String>,
}

/// Decides whether this host (`here`) can take a guest of `profile` and `vcpus` vCPUs that
/// ran as `saved` (None: a format version 1 state, which does not say). Err is the reason
/// to refuse it, one line.
pub fn admit(
    saved: Option<&GuestCpu>,
    profile: &CpuProfile,
    vcpus: u32,
    here: &HostView,
) -> Result<Admission, Refusal> {
    let mut report = None;
    if let Some(g) = saved.filter(|g| !g.cpuid.is_empty()) {
        let requested = cpuid::table::for_vcpu(&cpuid::table::guest_table(profile, vcpus), 0);
        let c = cpuid::effective::compare(&requested, &g.cpuid, &here.effective);
        if !c.refused.is_empty() {
            return Err(Refusal::OtherCpu(c.refused));
        }
        report = c.report();
    }
    let kvmclock = ["clocksource", "clocksource2"]
        .iter()
        .any(|c| profile.kvm_pv.contains(*c));
    let tsc = cpuid::tsc::plan(saved.map(|g| g.tsc_khz), here.tsc, profile.invtsc, kvmclock)?;
    Ok(Admission {
        tsc,
        report,
        made_on: saved
            .filter(|g| !g.host_vendor.is_empty())
            .map(|g| describe_host(&g.host_vendor, g.host_signature)),
    })
}

impl Admission {
    /// Sets the guest's TSC rate on every vCPU where the plan scales it, says in the log what
    /// is worth saying, and returns the rate the guest's TSC runs at here (kHz, 0 unknown;
    /// `host_khz` is this host's).
    pub fn apply(&self, vcpus: &[VcpuFd], host_khz: u32) -> Result<u32, Error> {
        if let Some(m) = &self.made_on {
            log::info!("the guest was saved on {m}");
        }
        if let Some(r) = &self.report {
            log::warn!("{r}");
        }
        if let Some(n) = self.tsc.note() {
            log::warn!("{n}");
        }
        Ok(match self.tsc {
            TscPlan::Scale { guest_khz, .. } => {
                for fd in vcpus {
                    fd.set_tsc_khz(guest_khz).map_err(kvm("KVM_SET_TSC_KHZ"))?;
                }
                guest_khz
            }
            TscPlan::Keep | TscPlan::Unknown { .. } | TscPlan::Unscaled { .. } => host_khz,
        })
    }
}
