//! The path glob dialect: a pattern (up to the first NUL) and a path
//! (after it) never panic, and a literal pattern matches itself.
#![no_main]

use faultbox_agent::glob::Glob;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, path) = text.split_once('\0').unwrap_or((text, text));
    if let Ok(glob) = Glob::new(pattern) {
        let _ = glob.matches(path);
        if !pattern.contains(['*', '?', '[', '\\']) {
            assert!(glob.matches(pattern), "{pattern:?} does not match itself");
        }
    }
});
