//! W3C trace context across the queue: an enqueue whose gRPC metadata carries
//! `traceparent` (and `tracestate`) stores them with the message as attributes of the
//! same names, and every delivery hands them back with the message's attributes, so
//! a producer's trace continues in the consumer (as CloudEvents' distributed tracing
//! extension and Dapr's pub/sub carry it).
//!
//! Best effort, never a refusal: a malformed `traceparent` is not carried, nor is a
//! trace context that would take the message over its limits (attribute count,
//! `max_message_bytes`), and the app's own attributes of those names win.

use crate::validate::{MAX_ATTRIBUTES, message_size};
use sluice_proto::v1;
use tonic::metadata::MetadataMap;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A W3C `traceparent`: `version-traceid-parentid-flags` in lower-case hex (2-32-16-2),
/// version not `ff`, trace and parent ids not all zeros.
pub fn valid_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |p: &str| p.bytes().any(|b| b != b'0');
    match parts.as_slice() {
        [v, t, p, f, ..] => {
            hex(v, 2)
                && *v != "ff"
                && (parts.len() == 4 || *v != "00")
                && hex(t, 32)
                && nonzero(t)
                && hex(p, 16)
                && nonzero(p)
                && hex(f, 2)
        }
        _ => false,
    }
}

/// The trace context of a call's metadata, if it carries a valid one.
pub fn context_of(meta: &MetadataMap) -> Option<Vec<(&'static str, String)>> {
    let parent = meta.get(TRACEPARENT)?.to_str().ok()?.trim();
    if !valid_traceparent(parent) {
        return None;
    }
    let mut ctx = vec![(TRACEPARENT, parent.to_string())];
    if let Some(state) = meta.get(TRACESTATE).and_then(|v| v.to_str().ok()) {
        ctx.push((TRACESTATE, state.trim().to_string()));
    }
    Some(ctx)
}

/// Stores `ctx` (from [`context_of`]) in `m`'s attributes, unless the app set its
/// own or the message would no longer fit its limits.
pub fn carry(ctx: &[(&'static str, String)], m: &mut v1::NewMessage, max_message_bytes: u64) {
    if ctx.iter().any(|(k, _)| m.attributes.contains_key(*k)) {
        return;
    }
    let added: usize = ctx.iter().map(|(k, v)| k.len() + v.len()).sum();
    let fits = m.attributes.len() + ctx.len() <= MAX_ATTRIBUTES
        && (message_size(m) + added) as u64 <= max_message_bytes;
    if fits {
        for (k, v) in ctx {
            m.attributes.insert(k.to_string(), v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparents_are_checked_as_w3c_writes_them() {
        assert!(valid_traceparent(PARENT));
        // A later version may add fields.
        assert!(valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }

    fn meta(parent: &str, state: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(TRACEPARENT, parent.parse().unwrap());
        if let Some(s) = state {
            m.insert(TRACESTATE, s.parse().unwrap());
        }
        m
    }

    #[test]
    fn the_context_is_carried_unless_the_app_set_its_own_or_it_would_not_fit() {
        let ctx = context_of(&meta(PARENT, Some("vendor=x"))).unwrap();
        let mut m = v1::NewMessage::default();
        carry(&ctx, &mut m, 1 << 20);
        assert_eq!(m.attributes[TRACEPARENT], PARENT);
        assert_eq!(m.attributes[TRACESTATE], "vendor=x");

        let mut own = v1::NewMessage::default();
        own.attributes
            .insert(TRACEPARENT.into(), "the app's".into());
        carry(&ctx, &mut own, 1 << 20);
        assert_eq!(own.attributes[TRACEPARENT], "the app's");
        assert!(!own.attributes.contains_key(TRACESTATE));

        let mut full = v1::NewMessage::default();
        for i in 0..MAX_ATTRIBUTES - 1 {
            full.attributes.insert(format!("a{i}"), String::new());
        }
        carry(&ctx, &mut full, 1 << 20);
        assert!(!full.attributes.contains_key(TRACEPARENT), "over the count");

        let mut big = v1::NewMessage {
            body: vec![0; 100].into(),
            ..Default::default()
        };
        carry(&ctx, &mut big, 120);
        assert!(big.attributes.is_empty(), "over max_message_bytes");

        assert!(context_of(&meta("garbage", None)).is_none());
        assert!(context_of(&MetadataMap::new()).is_none());
    }
}
