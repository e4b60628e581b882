//! SQL canonicalization (what `query=` rules compare): never a panic, and
//! canonical text is its own canonical form.
#![no_main]

use faultbox_proxy::rules::canonical_sql;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let once = canonical_sql(sql);
    assert_eq!(canonical_sql(&once), once, "{sql:?}");
});
