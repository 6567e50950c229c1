//! The log record decoder, as recovery meets it: any bytes at all (a damaged or
//! foreign segment), and any payload behind a matching checksum (so the fuzzer gets
//! past the CRC and into the field decoding). Never a panic; whatever decodes must
//! encode back to a frame that reads as the same record.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use sluice_broker::log::record::{Frame, Record, read_frame};

fn round_trip(rec: &Record) {
    let mut buf = BytesMut::new();
    rec.encode(&mut buf);
    let frame = buf.freeze();
    match read_frame(&frame) {
        Frame::Record(again, len) => {
            assert_eq!(&again, rec, "a decoded record must survive encoding");
            assert_eq!(len, frame.len(), "the whole frame is one record");
        }
        other => panic!("an encoded record does not read back: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let raw = Bytes::copy_from_slice(data);
    // The reader walks a segment frame by frame, as recovery does.
    let mut pos = 0;
    while pos < raw.len() {
        match read_frame(&raw.slice(pos..)) {
            Frame::Record(rec, len) => {
                assert!(len > 0 && pos + len <= raw.len());
                round_trip(&rec);
                pos += len;
            }
            Frame::Incomplete => break,
            Frame::Corrupt(_) => pos += 1,
        }
    }
    // The same bytes as a payload whose checksum matched.
    if let Ok(rec) = Record::decode(raw) {
        round_trip(&rec);
    }
});
