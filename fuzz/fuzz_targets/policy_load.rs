//! The policy loader on arbitrary text: never a panic, and every error placed at a
//! line and column inside the text (what `file:line:column` messages promise).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = sluice_policy::parse_str(Path::new("fuzz.yaml"), text) {
        assert!(!errors.0.is_empty(), "an error without a problem");
        // YAML breaks lines at CRLF, LF and a lone CR (YAML 1.2 §5.4).
        let lines = text.replace("\r\n", "\n").split(['\n', '\r']).count() as u64;
        for e in &errors.0 {
            assert!(
                (1..=lines).contains(&e.line) && e.column >= 1,
                "{e} (the text has {lines} lines)"
            );
        }
    }
});
