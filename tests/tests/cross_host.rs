//! What a move to another host exposes, on real KVM with real `ferry` processes: a snapshot
//! carries the guest CPU as its host ran it (GCPU: TSC rate, effective CPUID); a host that
//! takes the guest in refuses, before writing its memory, what the guest could notice (a TSC
//! rate it cannot give to a guest that needs it, another CPU), names what an emulating KVM
//! forced, and a KVM that refuses an MSR of the state is an error naming it.
//!
//! The saved states here are real snapshots of a tiny counting guest, edited where a real
//! other host would differ: its TSC rate, its CPUID table, an MSR this KVM does not have.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::process::{run_tiny, temp_path, Ferry};
use ferry_tests::tiny::LONG_COUNT;
use migration::{Leaf, VmState};

const LIMIT: Duration = Duration::from_secs(60);

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

/// A snapshot of the counting guest with `--cpu harpertown-shanghai`, decoded.
fn snapshot(name: &str) -> VmState {
    ferry_tests::require_kvm();
    let sock = temp_path(&format!("{name}.sock"));
    let file = temp_path(&format!("{name}.snap"));
    let mut f = run_tiny(&LONG_COUNT, &["--cpu", "harpertown-shanghai"], &sock);
    f.wait_line(LIMIT, |l| u64::from_str_radix(l, 16).is_ok_and(|n| n >= 20));
    let (ok, out) = f.ctl(&["snapshot", p(&file), "--stop"]);
    assert!(ok, "{out}");
    assert!(f.wait_exit(LIMIT).success(), "{}", f.transcript());
    migration::stream::decode_vm(&std::fs::read(&file).unwrap()).unwrap()
}

fn write(name: &str, state: &VmState) -> PathBuf {
    let file = temp_path(&format!("{name}.snap"));
    let mut out = Vec::new();
    migration::write_vm(&mut out, state).unwrap();
    std::fs::write(&file, out).unwrap();
    file
}

/// `ferry restore FILE`: Ok(the running process) once it counts, or Err(its one error line).
fn restore(name: &str, state: &VmState) -> Result<Ferry, String> {
    let file = write(name, state);
    let sock = temp_path(&format!("{name}-restored.sock"));
    let mut f = Ferry::spawn(&["restore", p(&file), "--api-socket", p(&sock)]);
    match f.wait_line_or_exit(LIMIT, |l| u64::from_str_radix(l, 16).is_ok()) {
        Ok(_) => Ok(f),
        Err(status) => {
            assert!(!status.success(), "{}", f.transcript());
            let err = f.stderr_lines();
            assert_eq!(err.len(), 1, "one error line:\n{}", f.transcript());
            assert!(err[0].starts_with("ferry: error: "), "{}", err[0]);
            Err(err[0].to_string())
        }
    }
}

/// This host's CPU vendor string, from /proc/cpuinfo.
fn host_vendor() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let line = info.lines().find(|l| l.starts_with("vendor_id")).unwrap();
    line.split(':').nth(1).unwrap().trim().to_string()
}

/// What this host's KVM gives a vCPU of the snapshot's profile.
fn host_view(s: &VmState) -> vmm::guest_cpu::admission::HostView {
    let kvm = vmm::vm::open_kvm().unwrap();
    let profile = cpuid::profile::CpuProfile::from_json("snapshot", &s.cpu_profile).unwrap();
    vmm::guest_cpu::admission::probe(&kvm, &profile, s.config.vcpus).unwrap()
}

fn entry(s: &mut VmState, function: u32, index: u32) -> &mut Leaf {
    let g = s.guest_cpu.as_mut().expect("a GCPU record");
    g.cpuid
        .iter_mut()
        .find(|e| e.function == function && e.index == index)
        .expect("the leaf")
}

#[test]
fn a_snapshot_carries_the_guest_cpu_as_this_host_ran_it() {
    let s = snapshot("gcpu");
    let g = s.guest_cpu.as_ref().expect("format version 2 carries GCPU");
    assert_eq!(g.host_vendor, host_vendor());
    let here = host_view(&s);
    assert!(g.tsc_khz > 0, "{g:?}");
    assert_eq!(g.tsc_khz, here.tsc.khz, "the guest's rate is this host's");
    let leaves = g.cpuid.clone();
    let table = cpuid::CpuidDump::new("saved", leaves);
    assert_eq!(
        table.vendor_string(),
        "GenuineIntel",
        "the profile's vendor"
    );
    assert_eq!(table.family_model_stepping(), Some((6, 0x17, 6)), "E5420");
    assert_eq!(
        table.leaves, here.effective,
        "the table as KVM holds it, the same for a new vCPU of the profile here"
    );
}

#[test]
fn a_tsc_rate_this_host_cannot_give_is_refused_unless_kvmclock_keeps_the_time() {
    let mut s = snapshot("tsc");
    let here = host_view(&s);
    let other = here.tsc.khz + here.tsc.khz / 10;
    s.guest_cpu.as_mut().unwrap().tsc_khz = other;
    // Without kvmclock in the profile, nothing would keep the guest's time at another rate.
    let mut profile: serde_json::Value = serde_json::from_str(&s.cpu_profile).unwrap();
    profile["kvm_pv"] = serde_json::json!([]);
    let mut no_kvmclock = s.clone();
    no_kvmclock.cpu_profile = profile.to_string();
    match restore("tsc-no-kvmclock", &no_kvmclock) {
        Err(e) => {
            assert!(!here.tsc.can_scale, "a host that scales refused: {e}");
            for want in [
                other.to_string(),
                here.tsc.khz.to_string(),
                "kvmclock".into(),
            ] {
                assert!(e.contains(&want), "{e:?} does not name {want}");
            }
        }
        Ok(f) => assert!(here.tsc.can_scale, "restored:\n{}", f.transcript()),
    }
    // With kvmclock (as every built-in profile offers it) the guest goes on, told why.
    let mut f = restore("tsc-kvmclock", &s).expect("a guest on kvmclock is taken");
    assert!(f.ctl(&["stop"]).0);
    f.wait_exit(LIMIT);
    let said = f.stderr_lines().join("\n");
    if here.tsc.can_scale {
        assert!(said.contains("scaled by KVM"), "{said}");
    } else {
        assert!(
            said.contains(&format!("ran at {other} kHz")) && said.contains("kvmclock"),
            "{said}"
        );
    }
}

#[test]
fn another_cpu_is_refused_and_what_a_kvm_forced_is_named() {
    let s = snapshot("cpuid");
    let mut other_model = s.clone();
    entry(&mut other_model, 1, 0).eax = 0x0001_0677;
    let e = restore("cpuid-model", &other_model).expect_err("another signature");
    assert!(
        e.contains("another CPU") && e.contains("family/model/stepping"),
        "{e}"
    );
    // The saving host's KVM forced AVX512_4FMAPS (a Xeon Phi feature no host of ours has);
    // the profile hides it: the guest is taken, and the log names it.
    let mut forced = s.clone();
    entry(&mut forced, 7, 0).edx |= 1 << 3;
    let mut f = restore("cpuid-forced", &forced).expect("forced bits are not refused");
    assert!(f.ctl(&["stop"]).0);
    f.wait_exit(LIMIT);
    let said = f.stderr_lines().join("\n");
    assert!(
        said.contains("forced by the saving host's KVM, not here: avx512_4fmaps"),
        "{said}"
    );
}

#[test]
fn an_msr_outside_the_profiles_allowlist_is_refused_naming_it() {
    let mut s = snapshot("msr");
    // IA32_PL0_SSP: this profile has no shadow stacks, so ferry never saves it.
    s.vcpus[0].msrs.push((0x6a4, 1 << 63));
    let e = restore("msr", &s).expect_err("refused before KVM sees it");
    assert!(e.contains("MSR 0x6a4 (IA32_PLn_SSP)"), "{e}");
    assert!(e.contains("cannot have"), "{e}");
    assert!(e.contains("vcpu0"), "{e}");
    // One no profile has, which KVM would take from the host: IA32_FEATURE_CONTROL.
    let mut s = snapshot("msr-feature-control");
    s.vcpus[0].msrs.insert(1, (0x3a, 1));
    let e = restore("msr-feature-control", &s).expect_err("refused");
    assert!(e.contains("MSR 0x3a") && e.contains("cannot have"), "{e}");
}

#[test]
fn an_allowed_msr_this_kvm_does_not_take_is_an_error_naming_it() {
    let mut s = snapshot("msr-value");
    // The MTRR default type is carried for every profile; KVM refuses reserved bits in it.
    let def_type = s.vcpus[0]
        .msrs
        .iter_mut()
        .find(|(m, _)| *m == 0x2ff)
        .expect("IA32_MTRR_DEF_TYPE is carried");
    def_type.1 = u64::MAX;
    let e = restore("msr-value", &s).expect_err("KVM_SET_MSRS stops short");
    assert!(e.contains("MSR 0x2ff"), "{e}");
    assert!(e.contains("vcpu0"), "{e}");
}

#[test]
fn a_destination_refuses_another_cpu_before_any_memory() {
    let s = snapshot("hello");
    let mut g = s.guest_cpu.clone().unwrap();
    g.cpuid
        .iter_mut()
        .find(|e| e.function == 0)
        .map(|e| e.ebx = u32::from_le_bytes(*b"Auth"))
        .unwrap();
    let hello = migration::protocol::Hello::new(
        s.config.memory,
        s.config.vcpus,
        s.cpu_profile.clone(),
        Some(g),
    );
    let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        vmm::migrate::receive_over(b, None, Box::new(ferry_tests::tiny::Console::default()))
    });
    use migration::protocol::{self, Message};
    protocol::send(&mut a, &Message::Hello(hello)).unwrap();
    match protocol::recv(&mut a).unwrap() {
        Message::Refuse(r) => assert!(r.contains("vendor AuthineIntel -> GenuineIntel"), "{r}"),
        other => panic!("{other:?}"),
    }
    let e = dest.join().unwrap().expect_err("refused");
    assert!(e.to_string().contains("another CPU"), "{e}");
}
