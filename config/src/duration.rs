//! Go-style durations ("300ms", "1.5h", "2h45m"), as Kubernetes uses them, plus the
//! unit `d` (24h: Queues have always accepted "14d").
//! Written here rather than taken from humantime because that crate's grammar differs
//! from Go's (it rejects "1.5h" and accepts words), and a Queue's "30s" must mean the
//! same to kubectl users as to the broker.
//!
//! This is the one parser: the broker reads `broker.toml` with it, and the operator's
//! Queue resource holds [`GoDuration`]s, whose JSON schema ([`DURATION_PATTERN`],
//! [`DURATION_MAX_CHARS`]) admits only strings it parses.

use crate::ConfigError;
use std::time::Duration;

/// The duration grammar as a regular expression (anchored, RE2 and Rust `regex`
/// syntax): `0`, or one or more `<number><unit>`, the number with an optional
/// fraction, the unit one of `ns us µs ms s m h d`. Over these characters it accepts
/// exactly what [`parse_duration`] accepts (which also tolerates surrounding blanks
/// and a leading `+`).
pub const DURATION_PATTERN: &str = r"^(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h|d))+)$";

/// The longest duration string the Queue schema accepts. Any string of at most 15
/// characters matching [`DURATION_PATTERN`] is below 10^14 days, which fits
/// [`Duration`] (u64 seconds): so everything the schema accepts parses.
pub const DURATION_MAX_CHARS: u32 = 15;

pub fn parse_duration(text: &str) -> Result<Duration, ConfigError> {
    let err = |reason: &str| ConfigError::Duration {
        value: text.to_string(),
        reason: reason.to_string(),
    };
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s.starts_with('-') {
        return Err(err("must not be negative"));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("missing unit (use ns, us, ms, s, m, h or d)"))?;
        if num_end == 0 {
            return Err(err("expected a number"));
        }
        let number = &rest[..num_end];
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_nanos: u128 = match &rest[..unit_end] {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            _ => return Err(err("unknown unit (use ns, us, ms, s, m, h or d)")),
        };
        rest = &rest[unit_end..];
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if int.is_empty() && frac.is_empty() || frac.contains('.') {
            return Err(err("malformed number"));
        }
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| err("number too large"))?
        };
        let mut value = int
            .checked_mul(unit_nanos)
            .ok_or_else(|| err("too large"))?;
        let mut scale = unit_nanos;
        for digit in frac.bytes() {
            scale /= 10;
            value += u128::from(digit - b'0') * scale;
        }
        total_nanos = total_nanos
            .checked_add(value)
            .ok_or_else(|| err("too large"))?;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| err("too large"))?;
    Ok(Duration::new(secs, (total_nanos % 1_000_000_000) as u32))
}

/// Formats the shortest Go-style string for a duration ("90s" → "1m30s").
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let mut out = String::new();
    let total_ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) || total_ms == 0 {
        return format!("{}ns", d.as_nanos());
    }
    let (h, rem) = (total_ms / 3_600_000, total_ms % 3_600_000);
    let (m, rem) = (rem / 60_000, rem % 60_000);
    let (s, ms) = (rem / 1000, rem % 1000);
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

/// A duration written as a Go-style string: what a Queue's duration fields hold and
/// what `broker.toml` holds (its fields are `std::time::Duration`s serialized through
/// this type). Parsed by [`parse_duration`], written by [`format_duration`]; with the
/// feature `schemars`, its JSON schema is a string matching [`DURATION_PATTERN`] of at
/// most [`DURATION_MAX_CHARS`] characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    pub const ZERO: GoDuration = GoDuration(Duration::ZERO);

    pub const fn from_millis(ms: u64) -> Self {
        GoDuration(Duration::from_millis(ms))
    }

    pub const fn from_secs(secs: u64) -> Self {
        GoDuration(Duration::from_secs(secs))
    }
}

impl From<Duration> for GoDuration {
    fn from(d: Duration) -> Self {
        GoDuration(d)
    }
}

impl From<GoDuration> for Duration {
    fn from(d: GoDuration) -> Self {
        d.0
    }
}

impl std::str::FromStr for GoDuration {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        parse_duration(s).map(GoDuration)
    }
}

impl std::fmt::Display for GoDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl serde::Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(GoDuration)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "schemars")]
impl schemars::JsonSchema for GoDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": DURATION_MAX_CHARS,
        })
    }
}

/// `#[serde(with)]` for the `std::time::Duration` fields of the settings: the same
/// text as [`GoDuration`].
pub(crate) mod serde_str {
    use super::GoDuration;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        GoDuration(*d).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        GoDuration::deserialize(d).map(|g| g.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("0", 0),
            ("0s", 0),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("1.5h", 5_400_000),
            ("250ms", 250),
            ("2h45m10s", 9_910_000),
            ("336h", 1_209_600_000),
            ("14d", 1_209_600_000),
            ("1d12h", 129_600_000),
            (".5s", 500),
            ("1.s", 1000),
        ];
        for (text, ms) in cases {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_millis(ms),
                "{text}"
            );
        }
        assert_eq!(parse_duration("1us").unwrap(), Duration::from_micros(1));
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in [
            "",
            "30",
            "-5s",
            "5 minutes",
            "1w",
            "s",
            "1..5s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn formats_round_trip() {
        for ms in [
            0u64,
            1,
            999,
            1000,
            90_000,
            5_400_000,
            1_209_600_000,
            3_723_004,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d, "{ms}");
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
    }
}
