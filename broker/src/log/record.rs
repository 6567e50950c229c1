//! Log records and their framing: `[len u32][crc32 u32][payload]`, little endian.
//! The CRC covers the payload; a frame that fails it is damage, never trusted.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame header size: length and CRC.
pub const HEADER: usize = 8;
/// Frames larger than this are damage (the largest message plus its metadata fits).
pub const MAX_PAYLOAD: usize = 80 * 1024 * 1024;

/// Why a message left the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SettleReason {
    Acked = 0,
    DeadLettered = 1,
    Dropped = 2,
    Expired = 3,
    Redriven = 4,
}

impl SettleReason {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Acked,
            1 => Self::DeadLettered,
            2 => Self::Dropped,
            3 => Self::Expired,
            4 => Self::Redriven,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnqueueRecord {
    pub seq: u64,
    pub enqueued_at_ms: u64,
    pub visible_at_ms: u64,
    pub key: String,
    pub dedup_id: String,
    pub attributes: Vec<(String, String)>,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Enqueue(EnqueueRecord),
    /// The message is gone for good.
    Settle {
        seq: u64,
        reason: SettleReason,
    },
    /// The message was leased for the `delivery`th time.
    Deliver {
        seq: u64,
        delivery: u32,
    },
    /// The message was given back, visible again at `visible_at_ms`.
    Requeue {
        seq: u64,
        visible_at_ms: u64,
    },
}

const ENQUEUE: u8 = 1;
const SETTLE: u8 = 2;
const DELIVER: u8 = 3;
const REQUEUE: u8 = 4;

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u32_le(s.len() as u32);
    buf.put_slice(s);
}

impl Record {
    /// Appends the framed record to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let start = buf.len();
        buf.put_u64_le(0); // header, filled below
        match self {
            Record::Enqueue(e) => {
                buf.put_u8(ENQUEUE);
                buf.put_u64_le(e.seq);
                buf.put_u64_le(e.enqueued_at_ms);
                buf.put_u64_le(e.visible_at_ms);
                put_str(buf, e.key.as_bytes());
                put_str(buf, e.dedup_id.as_bytes());
                buf.put_u32_le(e.attributes.len() as u32);
                for (k, v) in &e.attributes {
                    put_str(buf, k.as_bytes());
                    put_str(buf, v.as_bytes());
                }
                put_str(buf, &e.body);
            }
            Record::Settle { seq, reason } => {
                buf.put_u8(SETTLE);
                buf.put_u64_le(*seq);
                buf.put_u8(*reason as u8);
            }
            Record::Deliver { seq, delivery } => {
                buf.put_u8(DELIVER);
                buf.put_u64_le(*seq);
                buf.put_u32_le(*delivery);
            }
            Record::Requeue { seq, visible_at_ms } => {
                buf.put_u8(REQUEUE);
                buf.put_u64_le(*seq);
                buf.put_u64_le(*visible_at_ms);
            }
        }
        let payload_len = buf.len() - start - HEADER;
        let crc = crc32fast::hash(&buf[start + HEADER..]);
        buf[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a payload whose CRC already matched. `payload` is a slice of a shared
    /// buffer so that bodies are not copied.
    pub fn decode(mut payload: Bytes) -> Result<Record, &'static str> {
        fn need(b: &Bytes, n: usize) -> Result<(), &'static str> {
            if b.remaining() < n {
                Err("record shorter than its fields")
            } else {
                Ok(())
            }
        }
        fn take_bytes(b: &mut Bytes) -> Result<Bytes, &'static str> {
            need(b, 4)?;
            let len = b.get_u32_le() as usize;
            need(b, len)?;
            Ok(b.split_to(len))
        }
        fn take_str(b: &mut Bytes) -> Result<String, &'static str> {
            String::from_utf8(take_bytes(b)?.to_vec()).map_err(|_| "string is not UTF-8")
        }
        need(&payload, 9)?;
        let kind = payload.get_u8();
        let seq = payload.get_u64_le();
        let rec = match kind {
            ENQUEUE => {
                need(&payload, 16)?;
                let enqueued_at_ms = payload.get_u64_le();
                let visible_at_ms = payload.get_u64_le();
                let key = take_str(&mut payload)?;
                let dedup_id = take_str(&mut payload)?;
                need(&payload, 4)?;
                let n = payload.get_u32_le() as usize;
                if n > payload.remaining() / 8 {
                    return Err("attribute count exceeds record");
                }
                let mut attributes = Vec::with_capacity(n);
                for _ in 0..n {
                    attributes.push((take_str(&mut payload)?, take_str(&mut payload)?));
                }
                let body = take_bytes(&mut payload)?;
                Record::Enqueue(EnqueueRecord {
                    seq,
                    enqueued_at_ms,
                    visible_at_ms,
                    key,
                    dedup_id,
                    attributes,
                    body,
                })
            }
            SETTLE => {
                need(&payload, 1)?;
                let reason =
                    SettleReason::from_u8(payload.get_u8()).ok_or("unknown settle reason")?;
                Record::Settle { seq, reason }
            }
            DELIVER => {
                need(&payload, 4)?;
                Record::Deliver {
                    seq,
                    delivery: payload.get_u32_le(),
                }
            }
            REQUEUE => {
                need(&payload, 8)?;
                Record::Requeue {
                    seq,
                    visible_at_ms: payload.get_u64_le(),
                }
            }
            _ => return Err("unknown record type"),
        };
        if payload.has_remaining() {
            return Err("trailing bytes after record");
        }
        Ok(rec)
    }
}

/// The outcome of reading one frame at the start of `buf`.
#[derive(Debug)]
pub enum Frame {
    /// A whole, intact record and the frame's total length.
    Record(Record, usize),
    /// Fewer bytes than a frame needs: a torn tail, or the end.
    Incomplete,
    /// The bytes are not a valid frame.
    Corrupt(&'static str),
}

/// Reads the frame at the start of `buf` (a slice of a shared buffer).
pub fn read_frame(buf: &Bytes) -> Frame {
    if buf.len() < HEADER {
        return Frame::Incomplete;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    if !(9..=MAX_PAYLOAD).contains(&len) {
        return Frame::Corrupt("impossible record length");
    }
    if buf.len() < HEADER + len {
        return Frame::Incomplete;
    }
    let payload = buf.slice(HEADER..HEADER + len);
    if crc32fast::hash(&payload) != crc {
        return Frame::Corrupt("checksum mismatch");
    }
    match Record::decode(payload) {
        Ok(rec) => Frame::Record(rec, HEADER + len),
        Err(why) => Frame::Corrupt(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Vec<Record> {
        vec![
            Record::Enqueue(EnqueueRecord {
                seq: 7,
                enqueued_at_ms: 1000,
                visible_at_ms: 2000,
                key: "k".into(),
                dedup_id: "d".into(),
                attributes: vec![("a".into(), "b".into())],
                body: Bytes::from_static(b"hello"),
            }),
            Record::Settle {
                seq: 7,
                reason: SettleReason::Acked,
            },
            Record::Deliver {
                seq: 7,
                delivery: 3,
            },
            Record::Requeue {
                seq: 7,
                visible_at_ms: 99,
            },
        ]
    }

    #[test]
    fn round_trip() {
        for rec in sample() {
            let mut buf = BytesMut::new();
            rec.encode(&mut buf);
            let buf = buf.freeze();
            match read_frame(&buf) {
                Frame::Record(back, n) => {
                    assert_eq!(back, rec);
                    assert_eq!(n, buf.len());
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_flip_is_caught() {
        let mut buf = BytesMut::new();
        sample()[0].encode(&mut buf);
        let buf = buf.freeze();
        for cut in 0..buf.len() {
            assert!(matches!(
                read_frame(&buf.slice(..cut)),
                Frame::Incomplete | Frame::Corrupt(_)
            ));
        }
        for i in 0..buf.len() {
            let mut bad = buf.to_vec();
            bad[i] ^= 0x40;
            assert!(
                !matches!(read_frame(&Bytes::from(bad)), Frame::Record(..)),
                "flip at {i} went unnoticed"
            );
        }
    }
}
