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

/// What a replicated partition's log entry carries.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryPayload {
    /// A new leader's first entry.
    Blank,
    /// Partition records: `len` bytes of frames that follow the header directly.
    Records { len: u32 },
    /// The voter sets (two during a joint change) and every member.
    Membership {
        configs: Vec<Vec<u64>>,
        nodes: Vec<u64>,
    },
}

/// The head of a replicated partition's log entry: its Raft log id (the term and the
/// node that led it, and its index) and payload. The log of a replicated partition is
/// its Raft log: these headers, each followed by the records it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryHeader {
    pub index: u64,
    pub term: u64,
    pub node: u64,
    pub payload: EntryPayload,
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
    /// A replicated partition's log entry begins.
    Entry(EntryHeader),
    /// A replicated partition's leader found that entries up to `index` hold no live
    /// message and no dedup id still in its window: every copy may snapshot there and
    /// drop them. Sequence numbers go on from `next_seq`.
    Floor {
        index: u64,
        next_seq: u64,
    },
}

const ENQUEUE: u8 = 1;
const SETTLE: u8 = 2;
const DELIVER: u8 = 3;
const REQUEUE: u8 = 4;
const ENTRY: u8 = 5;
const FLOOR: u8 = 6;

const BLANK: u8 = 0;
const RECORDS: u8 = 1;
const MEMBERSHIP: u8 = 2;

fn put_ids(buf: &mut BytesMut, ids: &[u64]) {
    buf.put_u32_le(ids.len() as u32);
    for id in ids {
        buf.put_u64_le(*id);
    }
}

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
            Record::Floor { index, next_seq } => {
                buf.put_u8(FLOOR);
                buf.put_u64_le(*index);
                buf.put_u64_le(*next_seq);
            }
            Record::Entry(h) => {
                buf.put_u8(ENTRY);
                buf.put_u64_le(h.index);
                buf.put_u64_le(h.term);
                buf.put_u64_le(h.node);
                match &h.payload {
                    EntryPayload::Blank => buf.put_u8(BLANK),
                    EntryPayload::Records { len } => {
                        buf.put_u8(RECORDS);
                        buf.put_u32_le(*len);
                    }
                    EntryPayload::Membership { configs, nodes } => {
                        buf.put_u8(MEMBERSHIP);
                        buf.put_u32_le(configs.len() as u32);
                        for c in configs {
                            put_ids(buf, c);
                        }
                        put_ids(buf, nodes);
                    }
                }
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
        fn take_ids(b: &mut Bytes) -> Result<Vec<u64>, &'static str> {
            need(b, 4)?;
            let n = b.get_u32_le() as usize;
            if n > b.remaining() / 8 {
                return Err("id count exceeds record");
            }
            Ok((0..n).map(|_| b.get_u64_le()).collect())
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
            ENTRY => {
                need(&payload, 17)?;
                let term = payload.get_u64_le();
                let node = payload.get_u64_le();
                let payload_kind = payload.get_u8();
                let entry_payload = match payload_kind {
                    BLANK => EntryPayload::Blank,
                    RECORDS => {
                        need(&payload, 4)?;
                        EntryPayload::Records {
                            len: payload.get_u32_le(),
                        }
                    }
                    MEMBERSHIP => {
                        need(&payload, 4)?;
                        let n = payload.get_u32_le() as usize;
                        if n > payload.remaining() / 4 {
                            return Err("config count exceeds record");
                        }
                        let mut configs = Vec::with_capacity(n);
                        for _ in 0..n {
                            configs.push(take_ids(&mut payload)?);
                        }
                        let nodes = take_ids(&mut payload)?;
                        EntryPayload::Membership { configs, nodes }
                    }
                    _ => return Err("unknown entry payload"),
                };
                Record::Entry(EntryHeader {
                    index: seq,
                    term,
                    node,
                    payload: entry_payload,
                })
            }
            FLOOR => {
                need(&payload, 8)?;
                Record::Floor {
                    index: seq,
                    next_seq: payload.get_u64_le(),
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
            Record::Floor {
                index: 40,
                next_seq: 1000,
            },
            Record::Entry(EntryHeader {
                index: 12,
                term: 3,
                node: 1,
                payload: EntryPayload::Records { len: 4096 },
            }),
            Record::Entry(EntryHeader {
                index: 13,
                term: 4,
                node: 2,
                payload: EntryPayload::Blank,
            }),
            Record::Entry(EntryHeader {
                index: 1,
                term: 0,
                node: 0,
                payload: EntryPayload::Membership {
                    configs: vec![vec![0, 1, 2], vec![1, 2, 3]],
                    nodes: vec![0, 1, 2, 3],
                },
            }),
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
        for rec in [&sample()[0], &sample()[7]] {
            damage_is_caught(rec);
        }
    }

    fn damage_is_caught(rec: &Record) {
        let mut buf = BytesMut::new();
        rec.encode(&mut buf);
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
