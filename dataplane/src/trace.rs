//! W3C trace context across the queue: an enqueue whose gRPC metadata carries
//! `traceparent` (and `tracestate`) stores them with the message as attributes of the
//! same names, and every delivery hands them back with the message's attributes, so
//! a producer's trace continues in the consumer (as CloudEvents' distributed tracing
//! extension and Dapr's pub/sub carry it).
//!
//! Best effort, never a refusal: a malformed `traceparent` is not carried, nor is a
//! trace context that would take the message over its limits (attribute count,
//! `max_message_bytes`), and the app's own attributes of those names win.
//!
//! Spans, when export is on ([`crate::server::logging`]), follow OpenTelemetry's
//! messaging conventions, in sidecar and broker alike:
//!
//! - `send <queue>` (producer), one per Enqueue call, child of the caller's context.
//!   Its own context is what the messages carry, so the consumer's work continues
//!   from it. A broker storing a batch the sidecar gathered from many calls links to
//!   each message's context (a span has one parent).
//! - `receive <queue>` (consumer), one per delivered message, child of the context
//!   the message carries.
//! - `ack|nack|extend <queue>` (client in the sidecar, server in the broker), one per
//!   settle call, child of the caller's context; the sidecar passes its own to the
//!   broker in the call's metadata.

use crate::validate::{MAX_ATTRIBUTES, message_size};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use sluice_proto::v1;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of Sluice's exported spans: kept out of the log.
pub const SPAN_TARGET: &str = "sluice::spans";

/// Whether spans are exported ([`crate::server::logging::init_tracing`] sets it):
/// while not, no span is made at all (the hot path pays one load) and messages carry
/// the caller's trace context as it came.
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

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

/// The span of one enqueue call (`messages` in it), child of the caller's context
/// (`meta`); it links to contexts the messages already carry (a sidecar's batch of
/// many producers' messages).
pub fn send_span(queue: &str, meta: &MetadataMap, messages: &[v1::NewMessage]) -> Span {
    if !exporting() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "send",
        otel.name = format!("send {queue}"),
        otel.kind = "producer",
        messaging.system = "sluice",
        messaging.operation.type = "send",
        messaging.destination.name = queue,
        messaging.batch.message_count = messages.len(),
    );
    if span.is_disabled() {
        return span;
    }
    let _ = span.set_parent(parent_of(meta));
    for m in messages.iter().take(MAX_LINKS) {
        let linked = extract(&m.attributes);
        let sc = linked.span().span_context().clone();
        if sc.is_valid() {
            span.add_link(sc);
        }
    }
    span
}

/// A span links to at most this many messages (OpenTelemetry's default limit).
const MAX_LINKS: usize = 128;

/// The trace context an enqueue's messages carry: the send span's own while spans are
/// exported, else the caller's as it came (see [`context_of`]).
pub fn carried(span: &Span, meta: &MetadataMap) -> Option<Vec<(&'static str, String)>> {
    if !exporting() || span.is_disabled() {
        return context_of(meta);
    }
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut out);
    let parent = out.remove(TRACEPARENT)?;
    let mut ctx = vec![(TRACEPARENT, parent)];
    if let Some(state) = out.remove(TRACESTATE).filter(|s| !s.is_empty()) {
        ctx.push((TRACESTATE, state));
    }
    Some(ctx)
}

/// One `receive` span per message handed out, each a child of the context the message
/// carries.
pub fn delivered(queue: &str, messages: &[v1::Message]) {
    if !exporting() {
        return;
    }
    for m in messages {
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "receive",
            otel.name = format!("receive {queue}"),
            otel.kind = "consumer",
            messaging.system = "sluice",
            messaging.operation.type = "receive",
            messaging.destination.name = queue,
            messaging.message.id = %m.id,
            messaging.sluice.delivery_count = m.delivery_count,
        );
        if span.is_disabled() {
            return;
        }
        let _ = span.set_parent(extract(&m.attributes));
    }
}

/// The span of one ack, nack or extend call (`op`), child of the caller's context;
/// `kind` is `client` in the sidecar (it calls the brokers) and `server` in a broker.
pub fn settle_span(
    op: &'static str,
    kind: &'static str,
    queue: &str,
    meta: &MetadataMap,
    receipts: usize,
) -> Span {
    if !exporting() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "settle",
        otel.name = format!("{op} {queue}"),
        otel.kind = kind,
        messaging.system = "sluice",
        messaging.operation.type = "settle",
        messaging.operation.name = op,
        messaging.destination.name = queue,
        messaging.batch.message_count = receipts,
    );
    if !span.is_disabled() {
        let _ = span.set_parent(parent_of(meta));
    }
    span
}

/// Puts the current span's context in an outgoing call's metadata (sidecar to broker),
/// so the broker's span is its child. Nothing while spans are not exported.
pub fn inject_current(meta: &mut MetadataMap) {
    if !exporting() {
        return;
    }
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut MetadataInjector(meta));
}

fn parent_of(meta: &MetadataMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(meta))
}

fn extract(attributes: &HashMap<String, String>) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(attributes)
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(k, v);
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
