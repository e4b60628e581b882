//! Golden tests of spec error messages: every `tests/golden/NAME.star`
//! must fail to load with exactly the text in `NAME.err`. Regenerate with
//! `FAULTBOX_UPDATE_GOLDEN=1 cargo test -p faultbox-spec --test golden`
//! and review the diff.

use std::path::Path;

#[test]
fn spec_errors_match_their_golden_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("FAULTBOX_UPDATE_GOLDEN").is_some();
    let mut specs: Vec<_> = std::fs::read_dir(&dir)
        .expect("golden dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "star"))
        .collect();
    specs.sort();
    assert!(specs.len() >= 8, "golden specs are missing");
    let mut mismatches = Vec::new();
    for spec in specs {
        let message = match faultbox_spec::load::load(&spec) {
            Ok(_) => panic!("{} loaded, but it must fail", spec.display()),
            Err(e) => e.to_string().replace(&format!("{}/", dir.display()), ""),
        };
        let golden = spec.with_extension("err");
        if update {
            std::fs::write(&golden, format!("{message}\n")).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if want.trim_end() != message {
            mismatches.push(format!(
                "{}:\n--- want\n{}\n--- got\n{message}",
                spec.display(),
                want.trim_end()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}
