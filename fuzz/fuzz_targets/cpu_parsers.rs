//! What users and peers hand ferry as CPU descriptions: CPU dumps in every supported format
//! and CPU profile JSON (a migration's Hello carries one).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(dump) = cpuid::dump::parse_any("fuzz", text) {
        let _ = dump.vendor();
    }
    let _ = cpuid::profile::CpuProfile::from_json("fuzz", text);
});
