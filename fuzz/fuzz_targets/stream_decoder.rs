//! The VM stream decoder (snapshot files, the state at switchover): any bytes give a state
//! or an error; a state that decodes is valid and encodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(vm) = migration::stream::decode_vm(data) {
        migration::stream::validate(&vm).expect("a decoded stream is valid");
        let mut again = Vec::new();
        migration::stream::write_vm(&mut again, &vm).expect("and encodes again");
    }
});
