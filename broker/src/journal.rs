//! Where a partition's records go: its own log, or, when the queue replicates, its
//! Raft group (whose log is the partition's log on every copy). The partition above
//! decides the same way either way; only how long an answer waits differs.

use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::oneshot;

use crate::error::BrokerError;
use crate::log::record::Record;
use crate::log::{Location, LogError, LogWriter, SegmentReader};
use crate::replica::node::Replica;

pub enum Journal {
    Local(LogWriter),
    Replicated(Arc<Replica>),
}

impl Journal {
    fn writer(&self) -> &LogWriter {
        match self {
            Journal::Local(w) => w,
            Journal::Replicated(r) => &r.writer,
        }
    }

    /// Reads records back (bodies not kept in memory).
    pub fn reader(&self) -> &SegmentReader {
        &self.writer().reader
    }

    pub fn active_segment(&self) -> u64 {
        self.writer().active_segment()
    }

    /// Queues records; nobody waits for them (they ride along with the next write).
    pub fn append(&self, records: Bytes) {
        match self {
            Journal::Local(w) => w.append(records, None),
            Journal::Replicated(r) => r.append(records),
        }
    }

    /// Queues records and resolves to where they landed, once they are as durable as
    /// the queue promises: on this disk by its fsync mode, and when replicated, on a
    /// majority of the copies. `new_data`: they add messages (refused below the
    /// disk reserve).
    pub fn append_waiting(
        &self,
        records: Bytes,
        new_data: bool,
    ) -> impl Future<Output = Result<Location, BrokerError>> + use<> {
        enum Waiting {
            Local(oneshot::Receiver<Result<Location, LogError>>),
            Replicated(oneshot::Receiver<Result<Location, BrokerError>>),
        }
        let waiting = match self {
            Journal::Local(w) => {
                let (tx, rx) = oneshot::channel();
                if new_data {
                    w.append_new(records, tx);
                } else {
                    w.append(records, Some(tx));
                }
                Waiting::Local(rx)
            }
            Journal::Replicated(r) => Waiting::Replicated(r.append_waiting(records)),
        };
        async move {
            match waiting {
                Waiting::Local(rx) => Ok(rx.await.map_err(|_| LogError::Stopped)??),
                Waiting::Replicated(rx) => rx.await.map_err(|_| LogError::Stopped)?,
            }
        }
    }

    /// Segments below `segment` hold nothing live: drop them. A replicated partition
    /// publishes the floor as a record instead, and every copy drops its entries up
    /// to it once the record is committed.
    pub fn drop_below(&self, segment: u64, next_seq: u64) {
        match self {
            Journal::Local(w) => w.delete_below(segment),
            Journal::Replicated(r) => {
                if let Some(index) = r.last_entry_below(segment) {
                    let mut buf = BytesMut::new();
                    Record::Floor { index, next_seq }.encode(&mut buf);
                    r.append(buf.freeze());
                }
            }
        }
    }

    /// Writes and syncs everything queued and stops.
    pub async fn close(&self) -> Result<(), LogError> {
        match self {
            Journal::Local(w) => {
                let flushed = w.flush().await;
                w.close();
                flushed
            }
            Journal::Replicated(r) => {
                r.close().await;
                Ok(())
            }
        }
    }
}
