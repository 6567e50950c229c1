//! The broker's settings file (the operator writes it; a person may too) and the
//! Kubernetes-style durations in it. Never a panic; what parses and validates writes
//! back to TOML that parses to the same settings; a duration prints and parses back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_config::{BrokerFile, format_duration, parse_duration};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration(text) {
        let shown = format_duration(d);
        assert_eq!(
            parse_duration(&shown).ok(),
            Some(d),
            "{text:?} -> {shown:?}"
        );
    }
    if let Ok(file) = BrokerFile::from_toml(text, "fuzz.toml") {
        let written = toml::to_string(&file).expect("valid settings serialize");
        let again = BrokerFile::from_toml(&written, "fuzz.toml")
            .unwrap_or_else(|e| panic!("written settings do not parse: {e}\n{written}"));
        assert_eq!(again, file);
    }
});
