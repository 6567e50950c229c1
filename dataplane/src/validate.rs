//! Request validation both servers do before anything else: the limits of a message
//! (and its size against the queue's `max_message_bytes`), of a batch, of waits,
//! delays and visibility timeouts. The sidecar checks a message before it joins a
//! shared batch (one bad message must not fail the others'); the broker checks again,
//! as it may be called directly.

use bytes::Bytes;
use sluice_config::{MAX_DELAY, MAX_VISIBILITY_TIMEOUT};
use sluice_proto::v1;
use std::time::Duration;

/// Longest long poll a Dequeue may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
pub const MAX_ATTRIBUTES: usize = 64;
pub const MAX_KEY_BYTES: usize = 256;
pub const MAX_DEDUP_ID_BYTES: usize = 128;

/// A request the caller must fix (gRPC `INVALID_ARGUMENT`); the text says what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    pub fn new(msg: impl Into<String>) -> Self {
        Invalid(msg.into())
    }

    /// The same complaint about message `i` of a batch.
    pub fn in_message(self, i: usize) -> Self {
        Invalid(format!("message {i}: {}", self.0))
    }
}

impl From<Invalid> for tonic::Status {
    fn from(e: Invalid) -> tonic::Status {
        tonic::Status::invalid_argument(e.0)
    }
}

/// A new message as validated: attributes sorted by name.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub body: Bytes,
    pub attributes: Vec<(String, String)>,
    pub key: String,
    pub dedup_id: String,
    pub delay_ms: u64,
}

/// What a message counts against `max_message_bytes`: body, key, dedup id, attributes.
pub fn message_size(m: &v1::NewMessage) -> usize {
    m.body.len()
        + m.key.len()
        + m.dedup_id.len()
        + m.attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// Checks a message against the limits of every queue and the queue's own size limit.
pub fn check_message(m: &v1::NewMessage, max_message_bytes: u64) -> Result<(), Invalid> {
    if m.attributes.len() > MAX_ATTRIBUTES {
        return Err(Invalid(format!(
            "a message may carry at most {MAX_ATTRIBUTES} attributes, got {}",
            m.attributes.len()
        )));
    }
    if m.attributes.keys().any(|k| k.is_empty()) {
        return Err(Invalid::new("attribute names must not be empty"));
    }
    if m.key.len() > MAX_KEY_BYTES {
        return Err(Invalid(format!(
            "key is {} bytes; the limit is {MAX_KEY_BYTES}",
            m.key.len()
        )));
    }
    if m.dedup_id.len() > MAX_DEDUP_ID_BYTES {
        return Err(Invalid(format!(
            "dedup_id is {} bytes; the limit is {MAX_DEDUP_ID_BYTES}",
            m.dedup_id.len()
        )));
    }
    if m.delay_ms > MAX_DELAY.as_millis() as u64 {
        return Err(Invalid(format!(
            "delay_ms {} is more than the 15-day maximum ({})",
            m.delay_ms,
            MAX_DELAY.as_millis()
        )));
    }
    let size = message_size(m);
    if size as u64 > max_message_bytes {
        return Err(Invalid(format!(
            "message is {size} bytes with its key and attributes; the queue's limit (max_message_bytes) is {max_message_bytes}"
        )));
    }
    Ok(())
}

/// Checks a message (see [`check_message`]) and takes it apart for storing.
pub fn validate_message(m: v1::NewMessage, max_message_bytes: u64) -> Result<NewMessage, Invalid> {
    check_message(&m, max_message_bytes)?;
    let mut attributes: Vec<(String, String)> = m.attributes.into_iter().collect();
    attributes.sort();
    Ok(NewMessage {
        body: m.body,
        attributes,
        key: m.key,
        dedup_id: m.dedup_id,
        delay_ms: m.delay_ms,
    })
}

/// A batch of `n` messages for a queue taking at most `max_batch`.
pub fn check_batch_len(n: usize, max_batch: u32) -> Result<(), Invalid> {
    if n == 0 {
        return Err(Invalid::new("no messages given"));
    }
    if n > max_batch as usize {
        return Err(Invalid(format!(
            "batch of {n} messages is over the queue's max_batch of {max_batch}"
        )));
    }
    Ok(())
}

/// The visibility timeout a call asks for; 0 means the queue's `default_ms`.
pub fn validate_visibility(ms: u64, default_ms: u64) -> Result<u64, Invalid> {
    if ms == 0 {
        return Ok(default_ms);
    }
    if ms > MAX_VISIBILITY_TIMEOUT.as_millis() as u64 {
        return Err(Invalid(format!(
            "visibility timeout {ms} ms is more than the 12-hour maximum"
        )));
    }
    Ok(ms)
}

/// The new visibility timeout of an ExtendVisibility: never 0 (that would say
/// "the queue's default" elsewhere, and is surely a mistake here).
pub fn validate_extension(ms: u64, default_ms: u64) -> Result<u64, Invalid> {
    if ms == 0 {
        return Err(Invalid::new("visibility_timeout_ms must be above 0"));
    }
    validate_visibility(ms, default_ms)
}

/// The delay of a Nack.
pub fn validate_nack_delay(delay_ms: u64) -> Result<u64, Invalid> {
    if delay_ms > MAX_DELAY.as_millis() as u64 {
        return Err(Invalid(format!(
            "delay_ms {delay_ms} is over the 15-day maximum"
        )));
    }
    Ok(delay_ms)
}

/// The long poll of a Dequeue.
pub fn validate_wait(wait_ms: u64) -> Result<Duration, Invalid> {
    let wait = Duration::from_millis(wait_ms);
    if wait > MAX_WAIT {
        return Err(Invalid(format!(
            "wait_ms {wait_ms} is over the 60000 ms maximum"
        )));
    }
    Ok(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str) -> v1::NewMessage {
        v1::NewMessage {
            body: Bytes::from(body.to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn size_limit_counts_key_and_attributes() {
        let mut m = msg("abcd");
        m.key = "k".into();
        m.attributes.insert("a".into(), "bc".into());
        assert_eq!(message_size(&m), 8);
        assert!(check_message(&m, 8).is_ok());
        let e = check_message(&m, 7).unwrap_err();
        assert!(e.0.contains("max_message_bytes"), "{e}");
    }

    #[test]
    fn attributes_come_out_sorted() {
        let mut m = msg("x");
        for k in ["c", "a", "b"] {
            m.attributes.insert(k.into(), String::new());
        }
        let v = validate_message(m, 100).unwrap();
        let names: Vec<&str> = v.attributes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn refusals() {
        let mut m = msg("x");
        m.attributes.insert(String::new(), "v".into());
        assert!(check_message(&m, 100).is_err());
        let mut m = msg("x");
        m.key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(check_message(&m, 10_000).is_err());
        let mut m = msg("x");
        m.dedup_id = "d".repeat(MAX_DEDUP_ID_BYTES + 1);
        assert!(check_message(&m, 10_000).is_err());
        let mut m = msg("x");
        m.delay_ms = MAX_DELAY.as_millis() as u64 + 1;
        assert!(check_message(&m, 100).is_err());
        assert!(check_batch_len(0, 10).is_err());
        assert!(check_batch_len(11, 10).is_err());
        assert!(check_batch_len(10, 10).is_ok());
        assert_eq!(validate_visibility(0, 30_000), Ok(30_000));
        assert!(validate_visibility(MAX_VISIBILITY_TIMEOUT.as_millis() as u64 + 1, 1).is_err());
        assert!(validate_extension(0, 30_000).is_err());
        assert!(validate_wait(60_001).is_err());
        assert_eq!(
            Invalid::new("bad").in_message(3).to_string(),
            "message 3: bad"
        );
    }
}
