//! Receipts name one delivery of one message: `<partition>.<seq>.<delivery>` in hex.
//! The sidecar routes Ack/Nack/ExtendVisibility by the partition; the broker checks the
//! delivery number, so a receipt of an earlier delivery cannot settle a later one.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Receipt {
    pub partition: u32,
    pub seq: u64,
    pub delivery: u32,
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}.{:x}.{:x}", self.partition, self.seq, self.delivery)
    }
}

impl std::str::FromStr for Receipt {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const BAD: &str = "malformed receipt: pass the receipt of a delivered message unchanged";
        let mut parts = s.split('.');
        let mut next = || {
            parts
                .next()
                .filter(|p| !p.is_empty() && p.len() <= 16)
                .ok_or(BAD)
        };
        let partition = u32::from_str_radix(next()?, 16).map_err(|_| BAD)?;
        let seq = u64::from_str_radix(next()?, 16).map_err(|_| BAD)?;
        let delivery = u32::from_str_radix(next()?, 16).map_err(|_| BAD)?;
        if parts.next().is_some() {
            return Err(BAD);
        }
        Ok(Receipt {
            partition,
            seq,
            delivery,
        })
    }
}

/// A message id: sortable hex of partition and sequence number.
pub fn message_id(partition: u32, seq: u64) -> String {
    format!("{partition:04x}-{seq:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_garbage() {
        let r = Receipt {
            partition: 3,
            seq: 0xdead_beef_1234,
            delivery: 2,
        };
        assert_eq!(r.to_string().parse::<Receipt>().unwrap(), r);
        for bad in [
            "",
            "1.2",
            "1.2.3.4",
            "x.1.1",
            "1..1",
            "-1.2.3",
            "1.2.ffffffffffffffffff",
        ] {
            assert!(bad.parse::<Receipt>().is_err(), "{bad:?} accepted");
        }
        assert!(message_id(1, 2) < message_id(1, 10));
    }
}
