//! `--fault` and `--fs-fault` values: never a panic; whatever parses is a
//! rule the shim accepts, with a probability in 0..=1.
#![no_main]

use faultbox_agent::rule::{parse_fault, parse_fs_fault};
use faultbox_agent::syscalls::Arch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for arch in [Arch::X86_64, Arch::Aarch64] {
        for parsed in [parse_fault(text, arch), parse_fs_fault(text, arch)] {
            if let Ok(rule) = parsed {
                assert!((0.0..=1.0).contains(&rule.probability), "{text:?}");
                assert!(rule.validate(arch).is_ok(), "{text:?} parsed but is invalid");
            }
        }
    }
});
