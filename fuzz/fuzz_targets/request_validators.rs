//! What a client can send: messages (body, attributes, key, dedup id, delay) against
//! a queue's size limit, receipts, queue names. Never a panic; an accepted message is
//! within the limit; a receipt that parses prints to text that parses to it again.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_dataplane::receipts::parse_receipts;
use sluice_dataplane::validate::{message_size, validate_message};
use sluice_proto::{Receipt, v1};
use std::collections::HashMap;

/// Splits the input into NUL-separated fields: a cheap structure the fuzzer learns.
fn fields(data: &[u8]) -> Vec<String> {
    data.split(|&b| b == 0)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let delay_ms = u64::from_le_bytes(data[..8].try_into().unwrap());
    let limit = u64::from(data[8]) * 64;
    let f = fields(&data[9..]);
    let get = |i: usize| f.get(i).cloned().unwrap_or_default();
    let attributes: HashMap<String, String> = f
        .iter()
        .skip(3)
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|kv| {
            (
                kv[0].clone(),
                kv.get(1).map(|v| v.to_string()).unwrap_or_default(),
            )
        })
        .collect();
    let m = v1::NewMessage {
        body: Bytes::from(get(0)),
        attributes,
        key: get(1),
        dedup_id: get(2),
        delay_ms,
    };
    let size = message_size(&m);
    if let Ok(ok) = validate_message(m, limit) {
        assert!(
            size as u64 <= limit,
            "a message over the limit was accepted"
        );
        assert!(ok.attributes.windows(2).all(|w| w[0] <= w[1]));
    }

    if let Ok(parsed) = parse_receipts(&f) {
        for (text, r) in f.iter().zip(parsed) {
            if let Ok(r) = r {
                let shown = r.to_string();
                assert_eq!(
                    shown.parse::<Receipt>().ok(),
                    Some(r),
                    "{text:?} -> {shown:?}"
                );
            }
        }
    }
    for name in &f {
        let _ = sluice_config::validate_queue_name(name);
    }
});
