//! A partition's append-only, segmented log.
//!
//! One writer thread per partition does group commit: it takes every append waiting
//! for it, writes them with one `write`, and under `fsync: always` covers them all with
//! one `fdatasync` before answering any. Under `fsync: interval` or `never` the callers
//! may write their own appends instead ([`LogOptions::caller_writes`]), and the thread
//! only syncs. Segments are files named by a growing number;
//! a segment is deleted once no unsettled message lives in it or an older one (taken
//! out of the log at once, its space freed in the background: [`reaper`]).
//!
//! The active segment is allocated ahead of the writes (`fallocate`, a step at a time),
//! so that an append does not grow the file: its `fdatasync` then has no inode size to
//! write, which on ext4 cuts its latency by about a third. The allocated, unwritten tail
//! reads as zeros; a zero frame header (never a valid length) ends a segment's records.

mod reaper;
pub mod record;

use bytes::Bytes;
use sluice_config::FsyncMode;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use record::{Frame, Record, read_frame};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("disk full writing {path}: free space or raise the volume size")]
    DiskFull { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("record at {segment}:{offset} is damaged: {why}")]
    Damaged {
        segment: u64,
        offset: u64,
        why: &'static str,
    },
    #[error("the log writer has stopped")]
    Stopped,
}

impl LogError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(28) {
            LogError::DiskFull {
                path: path.to_path_buf(),
            }
        } else {
            LogError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Where a frame lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, Clone)]
pub struct LogOptions {
    pub fsync: FsyncMode,
    pub fsync_interval: Duration,
    pub segment_bytes: u64,
    /// Free bytes of the volume kept for records that settle or move messages: new
    /// messages are refused (`DiskFull`) below it, so that acks still land on a full disk.
    pub reserve_bytes: u64,
    /// Under `fsync: interval` or `never`, the calling thread writes its appends itself
    /// and the writer thread only syncs on the interval: nobody waits for an fsync,
    /// so handing each append to the thread would cost only wake-ups (two switches
    /// between threads per record). Not for a log whose `append_then` callbacks take
    /// locks its callers hold (a replica's).
    pub caller_writes: bool,
}

/// Observes the writer; the broker's metrics implement it.
pub trait LogObserver: Send + Sync + 'static {
    fn fsync(&self, took: Duration);
    fn damage(&self, segment: u64, offset: u64, why: &str);
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut ids = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| LogError::io("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io("listing", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = name.strip_suffix(".log").and_then(|n| n.parse().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Bytes of one log's segments on disk (0 when it has none or cannot be listed).
pub fn segment_bytes(dir: &Path) -> u64 {
    list_segments(dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|id| std::fs::metadata(segment_path(dir, id)).ok())
        .map(|m| m.len())
        .sum()
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    /// Damaged ranges skipped (segment, offset, why).
    pub damage: Vec<(u64, u64, &'static str)>,
    /// Bytes cut from the end of the last segment (a torn write).
    pub torn_tail: u64,
    /// Where the records of the last segment end: appends continue there.
    pub end: u64,
}

/// How far ahead of the writes the active segment is allocated.
const ALLOCATION_STEP: u64 = 4 << 20;

/// Whether every byte of `data` is zero: the allocated, never written tail of a segment.
fn all_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

/// Replays every segment in order, calling `apply` for each intact record.
/// A torn tail of the last segment is cut. Damage inside a segment is reported and
/// skipped: the reader searches forward for the next intact frame, so records after a
/// flipped byte survive too.
pub fn recover(
    dir: &Path,
    observer: &dyn LogObserver,
    mut apply: impl FnMut(Record, Location),
) -> Result<(Vec<u64>, RecoveryReport), LogError> {
    std::fs::create_dir_all(dir).map_err(|e| LogError::io("creating", dir, e))?;
    let ids = list_segments(dir)?;
    let mut report = RecoveryReport {
        segments: ids.len(),
        ..Default::default()
    };
    // One buffer for every segment: a fresh allocation per segment would fault in
    // (and zero) every page of it again.
    let mut buf: Vec<u8> = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let path = segment_path(dir, id);
        buf.clear();
        File::open(&path)
            .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut buf))
            .map_err(|e| LogError::io("reading", &path, e))?;
        let data = Bytes::from(std::mem::take(&mut buf));
        report.bytes += data.len() as u64;
        let is_last = i + 1 == ids.len();
        let mut pos = 0usize;
        // End of the last intact frame: where a torn tail would be cut.
        let mut good_end = 0usize;
        // Whether only zeros follow `good_end` (the allocated, unwritten tail).
        let mut zero_tail = true;
        while pos < data.len() {
            match read_frame(&data.slice(pos..)) {
                Frame::Record(rec, n) => {
                    apply(
                        rec,
                        Location {
                            segment: id,
                            offset: pos as u64,
                            len: n as u32,
                        },
                    );
                    report.records += 1;
                    pos += n;
                    good_end = pos;
                }
                Frame::Incomplete | Frame::Corrupt(_) => {
                    if all_zero(&data[pos..]) {
                        // The allocated tail: the records end here.
                        break;
                    }
                    zero_tail = false;
                    // Look for the next intact frame; if there is none, this is the tail.
                    // A frame's length is never zero: positions whose four length bytes
                    // are zero (a zeroed stretch) are skipped without parsing.
                    let mut next = None;
                    let mut p = pos + 1;
                    while p < data.len() {
                        match data[p..].iter().position(|&b| b != 0) {
                            None => break,
                            Some(nz) => p = (p + nz).saturating_sub(3).max(p),
                        }
                        if matches!(read_frame(&data.slice(p..)), Frame::Record(..)) {
                            next = Some(p);
                            break;
                        }
                        p += 1;
                    }
                    match next {
                        Some(p) => {
                            zero_tail = true;
                            let why = match read_frame(&data.slice(pos..)) {
                                Frame::Corrupt(why) => why,
                                _ => "truncated record",
                            };
                            observer.damage(id, pos as u64, why);
                            report.damage.push((id, pos as u64, why));
                            pos = p;
                        }
                        None => break,
                    }
                }
            }
        }
        let data_len = data.len();
        // Back into the buffer, unless `apply` kept a slice of it.
        if let Ok(unique) = data.try_into_mut() {
            buf = unique.into();
        }
        if is_last {
            report.end = good_end as u64;
        }
        if good_end < data_len && !zero_tail {
            let cut = (data_len - good_end) as u64;
            observer.damage(id, good_end as u64, "torn tail");
            if is_last {
                report.torn_tail = cut;
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| LogError::io("opening", &path, e))?;
                file.set_len(good_end as u64)
                    .and_then(|_| file.sync_all())
                    .map_err(|e| LogError::io("truncating", &path, e))?;
            } else {
                report
                    .damage
                    .push((id, good_end as u64, "damaged end of segment"));
            }
        }
    }
    Ok((ids, report))
}

/// Reads frames back (for bodies not kept in memory).
pub struct SegmentReader {
    dir: PathBuf,
    files: Mutex<HashMap<u64, Arc<File>>>,
}

impl SegmentReader {
    pub fn new(dir: &Path) -> Self {
        SegmentReader {
            dir: dir.to_path_buf(),
            files: Mutex::new(HashMap::new()),
        }
    }

    pub fn read(&self, loc: Location) -> Result<Record, LogError> {
        let buf = self.read_bytes(loc)?;
        match read_frame(&buf) {
            Frame::Record(rec, _) => Ok(rec),
            Frame::Corrupt(why) => Err(LogError::Damaged {
                segment: loc.segment,
                offset: loc.offset,
                why,
            }),
            Frame::Incomplete => Err(LogError::Damaged {
                segment: loc.segment,
                offset: loc.offset,
                why: "truncated record",
            }),
        }
    }

    /// The bytes at `loc`, unparsed (a replicated entry's records).
    pub fn read_bytes(&self, loc: Location) -> Result<Bytes, LogError> {
        let file = {
            let mut files = self.files.lock().unwrap();
            match files.get(&loc.segment) {
                Some(f) => f.clone(),
                None => {
                    let path = segment_path(&self.dir, loc.segment);
                    let f =
                        Arc::new(File::open(&path).map_err(|e| LogError::io("opening", &path, e))?);
                    files.insert(loc.segment, f.clone());
                    f
                }
            }
        };
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset)
            .map_err(|e| LogError::io("reading", &segment_path(&self.dir, loc.segment), e))?;
        Ok(Bytes::from(buf))
    }

    /// Closes the files of `first` and later segments (cut or removed).
    fn forget_from(&self, first: u64) {
        self.files.lock().unwrap().retain(|&id, _| id < first);
    }

    fn forget_below(&self, floor: u64, active: u64) {
        self.files
            .lock()
            .unwrap()
            .retain(|&id, _| id >= floor || id == active);
    }
}

pub type AppendResult = Result<Location, LogError>;

/// Who hears where an append landed, once it is as durable as the fsync mode promises.
pub enum Done {
    Channel(oneshot::Sender<AppendResult>),
    /// Called on the writer thread, in append order, before any later append is
    /// answered (a replicated partition's log index is updated there, so a `flush`
    /// that returns finds every earlier entry placed).
    Call(Box<dyn FnOnce(AppendResult) + Send>),
}

impl Done {
    fn send(self, result: AppendResult) {
        match self {
            Done::Channel(tx) => {
                let _ = tx.send(result);
            }
            Done::Call(f) => f(result),
        }
    }
}

enum Command {
    Append {
        buf: Bytes,
        /// None: nobody waits (the record rides along with the next fsync).
        done: Option<Done>,
        /// Adds messages (subject to the disk reserve), rather than settling them.
        new_data: bool,
    },
    /// Delete every segment older than this one (except the active one).
    DeleteBelow(u64),
    /// Sync everything written, then answer.
    Flush(oneshot::Sender<Result<(), LogError>>),
    /// Cut the log at this place: what follows it, in its segment and later ones, is
    /// gone (a replica's log entries a new leader overrules, or all of them before a
    /// snapshot is installed). Answers once the cut is durable.
    Truncate {
        segment: u64,
        offset: u64,
        done: oneshot::Sender<Result<(), LogError>>,
    },
}

/// Handle to a partition's writer thread.
pub struct LogWriter {
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    /// With [`LogOptions::caller_writes`]: the writer's state, used by the callers; the
    /// thread only syncs. None: every command goes to the thread.
    inline: Option<Arc<Mutex<Inline>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    active: Arc<AtomicU64>,
    pub reader: Arc<SegmentReader>,
}

impl LogWriter {
    /// Opens the log for appending after recovery returned `segments`, whose last
    /// one holds records up to `end` (what [`RecoveryReport::end`] says).
    pub fn open(
        dir: &Path,
        segments: &[u64],
        end: u64,
        options: LogOptions,
        observer: Arc<dyn LogObserver>,
        name: String,
    ) -> Result<LogWriter, LogError> {
        reaper::delete_leftovers(dir);
        let active_id = segments.last().copied().unwrap_or(0);
        let path = segment_path(dir, active_id);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LogError::io("opening", &path, e))?;
        let allocated = file
            .metadata()
            .map_err(|e| LogError::io("opening", &path, e))?
            .len();
        let len = end;
        if segments.is_empty() {
            sync_dir(dir)?;
        }
        let active = Arc::new(AtomicU64::new(active_id));
        let reader = Arc::new(SegmentReader::new(dir));
        let (tx, rx) = mpsc::channel();
        let caller_writes = options.caller_writes && options.fsync != FsyncMode::Always;
        let mut state = WriterThread {
            dir: dir.to_path_buf(),
            segments: segments.to_vec(),
            file,
            path,
            len,
            allocated,
            options,
            observer,
            active: active.clone(),
            reader: reader.clone(),
            unsynced: false,
            last_sync: Instant::now(),
        };
        if state.segments.is_empty() {
            state.segments.push(active_id);
        }
        let thread = std::thread::Builder::new().name(format!("log-{name}"));
        let (inline, thread) = if caller_writes {
            let inline = Arc::new(Mutex::new(Inline {
                writer: state,
                staging: Vec::new(),
            }));
            let syncs = inline.clone();
            (
                Some(inline),
                thread.spawn(move || Inline::run_syncs(&syncs, rx)),
            )
        } else {
            (None, thread.spawn(move || state.run(rx)))
        };
        let thread = thread.map_err(|e| LogError::io("starting writer for", dir, e))?;
        Ok(LogWriter {
            inline,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            active,
            reader,
        })
    }

    fn send(&self, cmd: Command) -> bool {
        let cmd = match self.write_inline(cmd) {
            Ok(()) => return true,
            Err(cmd) => cmd,
        };
        match &*self.tx.lock().unwrap() {
            Some(tx) => tx.send(cmd).is_ok(),
            None => false,
        }
    }

    /// Carries out `cmd` on the calling thread, with [`LogOptions::caller_writes`]
    /// and while the log is open; else gives it back.
    fn write_inline(&self, cmd: Command) -> Result<(), Command> {
        let Some(inline) = &self.inline else {
            return Err(cmd);
        };
        // Held while writing: `close` cannot slip in between and sync before this.
        let open = self.tx.lock().unwrap();
        if open.is_none() {
            return Err(cmd);
        }
        let mut guard = inline.lock().unwrap();
        let Inline { writer, staging } = &mut *guard;
        writer.process(&mut vec![cmd], staging);
        Ok(())
    }

    /// Queues framed records; `done` hears where they landed once they are as durable
    /// as the fsync mode promises.
    pub fn append(&self, buf: Bytes, done: Option<oneshot::Sender<AppendResult>>) {
        self.push(buf, done.map(Done::Channel), false);
    }

    /// Like [`append`](Self::append), calling `done` on the writer thread.
    pub fn append_then(&self, buf: Bytes, done: impl FnOnce(AppendResult) + Send + 'static) {
        self.push(buf, Some(Done::Call(Box::new(done))), false);
    }

    /// Like [`append`](Self::append), for records that add messages: refused with
    /// `DiskFull` while the volume's free space is below the reserve.
    pub fn append_new(&self, buf: Bytes, done: oneshot::Sender<AppendResult>) {
        self.push(buf, Some(Done::Channel(done)), true);
    }

    fn push(&self, buf: Bytes, done: Option<Done>, new_data: bool) {
        let cmd = Command::Append {
            buf,
            done,
            new_data,
        };
        let Err(cmd) = self.write_inline(cmd) else {
            return;
        };
        let failed = match &*self.tx.lock().unwrap() {
            Some(tx) => tx.send(cmd).err().map(|e| e.0),
            None => Some(cmd),
        };
        if let Some(Command::Append { done: Some(d), .. }) = failed {
            d.send(Err(LogError::Stopped));
        }
    }

    pub fn delete_below(&self, floor: u64) {
        self.send(Command::DeleteBelow(floor));
    }

    pub async fn flush(&self) -> Result<(), LogError> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Flush(tx)) {
            return Err(LogError::Stopped);
        }
        rx.await.map_err(|_| LogError::Stopped)?
    }

    /// Cuts the log at `segment`:`offset` (see [`Command::Truncate`]), after what is
    /// queued before it is written. A segment id below every segment cuts it all.
    pub async fn truncate(&self, segment: u64, offset: u64) -> Result<(), LogError> {
        let (done, rx) = oneshot::channel();
        if !self.send(Command::Truncate {
            segment,
            offset,
            done,
        }) {
            return Err(LogError::Stopped);
        }
        rx.await.map_err(|_| LogError::Stopped)?
    }

    pub fn active_segment(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Stops the thread after it has written and synced everything queued.
    pub fn close(&self) {
        self.tx.lock().unwrap().take();
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.close();
    }
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io("syncing directory", dir, e))
}

/// The writer's state when callers write their own appends
/// ([`LogOptions::caller_writes`]).
struct Inline {
    writer: WriterThread,
    staging: Vec<u8>,
}

impl Inline {
    /// The thread of a log whose callers write: syncs every interval (`fsync:
    /// interval`) until the log closes, then once more (unless `fsync: never`).
    fn run_syncs(inline: &Mutex<Inline>, rx: mpsc::Receiver<Command>) {
        let (fsync, interval) = {
            let o = &inline.lock().unwrap().writer.options;
            (o.fsync, o.fsync_interval.max(Duration::from_millis(1)))
        };
        loop {
            let closed = match fsync {
                FsyncMode::Interval => matches!(
                    rx.recv_timeout(interval),
                    Err(mpsc::RecvTimeoutError::Disconnected)
                ),
                _ => rx.recv().is_err(),
            };
            if closed {
                break;
            }
            if fsync == FsyncMode::Interval {
                Self::sync(inline);
            }
        }
        if fsync != FsyncMode::Never {
            Self::sync(inline);
        }
    }

    /// Syncs what was written, without holding the state meanwhile: callers go on
    /// writing (what they write now is covered by the next sync).
    fn sync(inline: &Mutex<Inline>) {
        let (file, path, observer) = {
            let mut st = inline.lock().unwrap();
            let w = &mut st.writer;
            if !w.unsynced {
                return;
            }
            w.unsynced = false;
            (w.file.try_clone(), w.path.clone(), w.observer.clone())
        };
        let start = Instant::now();
        let result = file.and_then(|f| f.sync_data());
        observer.fsync(start.elapsed());
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "interval fsync failed; trying again at the next");
            inline.lock().unwrap().writer.unsynced = true;
        }
    }
}

struct WriterThread {
    dir: PathBuf,
    segments: Vec<u64>,
    file: File,
    path: PathBuf,
    len: u64,
    /// The file's size: written records end at `len`, zeros follow up to here.
    allocated: u64,
    options: LogOptions,
    observer: Arc<dyn LogObserver>,
    active: Arc<AtomicU64>,
    reader: Arc<SegmentReader>,
    unsynced: bool,
    last_sync: Instant,
}

impl WriterThread {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        let mut group = Vec::new();
        let mut staging = Vec::new();
        loop {
            let first = if self.options.fsync == FsyncMode::Interval && self.unsynced {
                let left = self
                    .options
                    .fsync_interval
                    .saturating_sub(self.last_sync.elapsed());
                match rx.recv_timeout(left) {
                    Ok(cmd) => Some(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(cmd) => Some(cmd),
                    Err(_) => break,
                }
            };
            group.extend(first);
            while let Ok(cmd) = rx.try_recv() {
                group.push(cmd);
            }
            self.process(&mut group, &mut staging);
        }
        // Channel closed: make what was written durable before exiting.
        if self.unsynced && self.options.fsync != FsyncMode::Never {
            let _ = self.sync();
        }
    }

    fn sync(&mut self) -> Result<(), LogError> {
        let start = Instant::now();
        let result = self
            .file
            .sync_data()
            .map_err(|e| LogError::io("syncing", &self.path, e));
        self.observer.fsync(start.elapsed());
        self.last_sync = Instant::now();
        if result.is_ok() {
            self.unsynced = false;
        }
        result
    }

    /// Bytes an unprivileged writer may still use on the log's volume; on error, as if
    /// plenty (the write itself will then tell).
    fn free_bytes(&self) -> u64 {
        match rustix::fs::fstatvfs(&self.file) {
            Ok(st) => st.f_bavail.saturating_mul(st.f_frsize),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read free space");
                u64::MAX
            }
        }
    }

    /// Allocates the segment up to `need` bytes and a step beyond. Best effort: where
    /// the filesystem cannot (or the volume is full), writes grow the file instead.
    fn allocate(&mut self, need: u64) {
        if need <= self.allocated {
            return;
        }
        let step = ALLOCATION_STEP.min(self.options.segment_bytes.max(1));
        let target = need.div_ceil(step) * step;
        match rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, target) {
            Ok(()) => self.allocated = target,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot allocate ahead");
                // Do not try again for every group of this segment.
                self.allocated = u64::MAX;
            }
        }
    }

    fn roll(&mut self) -> Result<(), LogError> {
        if self.unsynced {
            self.sync()?;
        }
        // The sealed segment gives its allocated, unwritten tail back.
        if self.allocated > self.len {
            let _ = self.file.set_len(self.len);
        }
        let id = self.segments.last().copied().unwrap_or(0) + 1;
        let (file, path) = self.open_segment(id)?;
        sync_dir(&self.dir)?;
        self.segments.push(id);
        self.make_active(id, file, path, 0);
        Ok(())
    }

    /// Opens segment `id` for writing, creating it if need be.
    fn open_segment(&self, id: u64) -> Result<(File, PathBuf), LogError> {
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LogError::io("opening", &path, e))?;
        Ok((file, path))
    }

    /// Appends go to `file` (segment `id`, `len` bytes long) from now on.
    fn make_active(&mut self, id: u64, file: File, path: PathBuf, len: u64) {
        self.file = file;
        self.path = path;
        self.len = len;
        self.allocated = len;
        self.active.store(id, Ordering::Relaxed);
    }

    fn process(&mut self, group: &mut Vec<Command>, staging: &mut Vec<u8>) {
        let mut waiting: Vec<(Done, Location)> = Vec::new();
        let mut flushes = Vec::new();
        let mut delete_floor = None;
        let mut must_sync = false;
        staging.clear();
        let mut bufs = Vec::new();
        // Free space, read once per group and only when new messages ask for room.
        let mut free: Option<u64> = None;
        let mut admitted = 0u64;
        let mut truncate = None;
        let mut rest = Vec::new();
        let mut cmds = group.drain(..);
        for cmd in cmds.by_ref() {
            match cmd {
                Command::Append {
                    buf,
                    done,
                    new_data,
                } => {
                    if new_data && self.options.reserve_bytes > 0 {
                        let free = *free.get_or_insert_with(|| self.free_bytes());
                        admitted += buf.len() as u64;
                        if free < self.options.reserve_bytes.saturating_add(admitted) {
                            admitted -= buf.len() as u64;
                            if let Some(done) = done {
                                done.send(Err(LogError::DiskFull {
                                    path: self.path.clone(),
                                }));
                            }
                            continue;
                        }
                    }
                    if done.is_some() {
                        must_sync = true;
                    }
                    bufs.push((buf, done));
                }
                Command::DeleteBelow(floor) => {
                    delete_floor = Some(delete_floor.map_or(floor, |f: u64| f.max(floor)))
                }
                Command::Flush(tx) => {
                    must_sync = true;
                    flushes.push(tx);
                }
                Command::Truncate {
                    segment,
                    offset,
                    done,
                } => {
                    // Rare (a leader change): what came before is written first, what
                    // comes after waits for the next round.
                    truncate = Some((segment, offset, done));
                    break;
                }
            }
        }
        rest.extend(cmds);
        let mut write_result = Ok(());
        if !bufs.is_empty() && self.len >= self.options.segment_bytes {
            write_result = self.roll();
        }
        let base = self.len;
        if !bufs.is_empty() {
            let mut offset = base;
            for (buf, done) in bufs {
                staging.extend_from_slice(&buf);
                if let Some(done) = done {
                    waiting.push((
                        done,
                        Location {
                            segment: self.active.load(Ordering::Relaxed),
                            offset,
                            len: buf.len() as u32,
                        },
                    ));
                }
                offset += buf.len() as u64;
            }
            if write_result.is_ok() {
                self.allocate(offset);
                write_result = match self.file.write_all_at(staging, base) {
                    Ok(()) => {
                        self.len = offset;
                        self.unsynced = true;
                        Ok(())
                    }
                    Err(e) => {
                        // Cut what part of the group made it, so the file holds only
                        // whole records and the next group starts clean.
                        if self.file.set_len(base).is_ok() {
                            self.allocated = base;
                        }
                        Err(LogError::io("writing", &self.path, e))
                    }
                };
            }
        }
        let sync_now = match self.options.fsync {
            FsyncMode::Always => must_sync && self.unsynced || !flushes.is_empty(),
            FsyncMode::Interval => {
                // Where callers write ([`Inline`]), interval syncs are the thread's.
                !flushes.is_empty()
                    || !self.options.caller_writes
                        && self.last_sync.elapsed() >= self.options.fsync_interval
            }
            FsyncMode::Never => !flushes.is_empty(),
        };
        let mut sync_result = Ok(());
        if sync_now && self.unsynced && write_result.is_ok() {
            sync_result = self.sync();
            if sync_result.is_err() {
                // After a failed fsync the kernel may have dropped the dirty pages;
                // nothing in this group can be called durable. Cut it off.
                if self.file.set_len(base).is_ok() {
                    self.len = base;
                    self.allocated = base;
                }
            }
        }
        for (done, loc) in waiting {
            let result = match (&write_result, &sync_result) {
                (Err(e), _) | (Ok(()), Err(e)) => Err(clone_err(e)),
                _ => Ok(loc),
            };
            done.send(result);
        }
        for tx in flushes {
            let _ = tx.send(sync_result.as_ref().map(|_| ()).map_err(clone_err));
        }
        if let Some(floor) = delete_floor {
            let active = self.active.load(Ordering::Relaxed);
            let (gone, keep): (Vec<u64>, Vec<u64>) = self
                .segments
                .iter()
                .partition(|&&id| id < floor && id != active);
            for id in &gone {
                let path = segment_path(&self.dir, *id);
                if let Err(e) = reaper::delete(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not delete settled segment");
                }
            }
            if !gone.is_empty() {
                self.reader.forget_below(floor, active);
                self.segments = keep;
            }
        }
        if let Some((segment, offset, done)) = truncate {
            let _ = done.send(self.truncate(segment, offset));
        }
        if !rest.is_empty() {
            group.extend(rest);
            self.process(group, staging);
        }
    }

    /// Drops the segments after `segment` and cuts `segment` at `offset`; it becomes
    /// the active one. When `segment` is no longer in the log (older than all), every
    /// segment goes and a new one starts.
    fn truncate(&mut self, segment: u64, offset: u64) -> Result<(), LogError> {
        let keep_to = self.segments.iter().position(|&id| id >= segment);
        let (cut, offset) = match keep_to {
            Some(i) if self.segments[i] == segment => (i, offset),
            // The place is before segment `self.segments[i]` (or past the end): all of
            // that one goes too.
            Some(i) => (i, 0),
            None => return Ok(()),
        };
        let target = self.segments[cut];
        for &id in &self.segments[cut + 1..] {
            let path = segment_path(&self.dir, id);
            std::fs::remove_file(&path).map_err(|e| LogError::io("removing", &path, e))?;
        }
        self.segments.truncate(cut + 1);
        let (file, path) = self.open_segment(target)?;
        file.set_len(offset)
            .and_then(|_| file.sync_all())
            .map_err(|e| LogError::io("truncating", &path, e))?;
        sync_dir(&self.dir)?;
        self.make_active(target, file, path, offset);
        self.unsynced = false;
        self.reader.forget_from(target);
        Ok(())
    }
}

fn clone_err(e: &LogError) -> LogError {
    match e {
        LogError::DiskFull { path } => LogError::DiskFull { path: path.clone() },
        LogError::Io { op, path, source } => LogError::Io {
            op,
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        LogError::Damaged {
            segment,
            offset,
            why,
        } => LogError::Damaged {
            segment: *segment,
            offset: *offset,
            why,
        },
        LogError::Stopped => LogError::Stopped,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::record::{EnqueueRecord, SettleReason};
    use super::*;
    use bytes::BytesMut;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Seen {
        fsyncs: AtomicUsize,
        damage: Mutex<Vec<(u64, u64, String)>>,
    }
    impl LogObserver for Seen {
        fn fsync(&self, _: Duration) {
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        fn damage(&self, segment: u64, offset: u64, why: &str) {
            self.damage
                .lock()
                .unwrap()
                .push((segment, offset, why.into()));
        }
    }

    pub(crate) fn enq(seq: u64) -> Record {
        Record::Enqueue(EnqueueRecord {
            seq,
            enqueued_at_ms: 1,
            visible_at_ms: 1,
            key: String::new(),
            dedup_id: String::new(),
            attributes: vec![],
            body: Bytes::from(vec![b'x'; 100]),
        })
    }

    pub(crate) fn frame(r: &Record) -> Bytes {
        let mut b = BytesMut::new();
        r.encode(&mut b);
        b.freeze()
    }

    fn options(segment_bytes: u64) -> LogOptions {
        LogOptions {
            fsync: FsyncMode::Always,
            fsync_interval: Duration::from_millis(10),
            segment_bytes,
            reserve_bytes: 0,
            caller_writes: false,
        }
    }

    #[tokio::test]
    async fn below_the_reserve_new_messages_are_refused_and_settles_still_land() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Seen::default());
        // A reserve no volume has: the free space is always below it.
        let opts = LogOptions {
            reserve_bytes: u64::MAX / 2,
            ..options(1 << 20)
        };
        let w = LogWriter::open(dir.path(), &[], 0, opts, seen.clone(), "t".into()).unwrap();
        let (tx, rx) = oneshot::channel();
        w.append_new(frame(&enq(1)), tx);
        assert!(matches!(rx.await.unwrap(), Err(LogError::DiskFull { .. })));
        let settle = Record::Settle {
            seq: 7,
            reason: SettleReason::Acked,
        };
        let (tx, rx) = oneshot::channel();
        w.append(frame(&settle), Some(tx));
        rx.await.unwrap().unwrap();
        w.close();
        // Nothing of the refused message was written; the settle was.
        let (_, recs) = replay(dir.path(), &seen);
        assert_eq!(recs, vec![settle]);

        // With room to spare, new messages are written.
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions {
            reserve_bytes: 1,
            ..options(1 << 20)
        };
        let w = LogWriter::open(dir.path(), &[], 0, opts, seen.clone(), "t".into()).unwrap();
        let (tx, rx) = oneshot::channel();
        w.append_new(frame(&enq(1)), tx);
        rx.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn under_interval_fsync_callers_write_and_the_thread_only_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Seen::default());
        let opts = LogOptions {
            fsync: FsyncMode::Interval,
            caller_writes: true,
            ..options(1 << 20)
        };
        let w = LogWriter::open(dir.path(), &[], 0, opts, seen.clone(), "t".into()).unwrap();
        // Answered on the calling thread, before `append_then` returns, in order.
        let me = std::thread::current().id();
        let answers = Arc::new(Mutex::new(Vec::new()));
        for seq in 1..=3 {
            let to = answers.clone();
            w.append_then(frame(&enq(seq)), move |r| {
                to.lock()
                    .unwrap()
                    .push((std::thread::current().id(), r.unwrap().offset));
            });
            assert_eq!(answers.lock().unwrap().len(), seq as usize);
        }
        let answers = answers.lock().unwrap().clone();
        assert!(answers.iter().all(|(t, _)| *t == me), "{answers:?}");
        assert!(answers.windows(2).all(|a| a[0].1 < a[1].1), "{answers:?}");
        // The thread syncs on the interval, with nobody waiting.
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.fsyncs.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "no interval fsync");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A flush syncs on the caller's thread; after close, appends are refused.
        w.flush().await.unwrap();
        w.close();
        let (tx, rx) = oneshot::channel();
        w.append(frame(&enq(4)), Some(tx));
        assert!(matches!(rx.await.unwrap(), Err(LogError::Stopped)));
        let (_, recs) = replay(dir.path(), &seen);
        assert_eq!(recs, (1..=3).map(enq).collect::<Vec<_>>());
    }

    fn replay(dir: &Path, seen: &Seen) -> (Vec<u64>, Vec<Record>) {
        let mut recs = Vec::new();
        let (segs, _) = recover(dir, seen, |r, _| recs.push(r)).unwrap();
        (segs, recs)
    }

    #[tokio::test]
    async fn group_commit_answers_after_one_fsync_and_recovers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Seen::default());
        let w = LogWriter::open(
            dir.path(),
            &[],
            0,
            options(1 << 20),
            seen.clone(),
            "t".into(),
        )
        .unwrap();
        let mut waits = Vec::new();
        for seq in 1..=50 {
            let (tx, rx) = oneshot::channel();
            w.append(frame(&enq(seq)), Some(tx));
            waits.push(rx);
        }
        let mut locs = Vec::new();
        for rx in waits {
            locs.push(rx.await.unwrap().unwrap());
        }
        let fsyncs = seen.fsyncs.load(Ordering::Relaxed);
        assert!(
            (1..50).contains(&fsyncs),
            "{fsyncs} fsyncs for 50 appends: not grouped"
        );
        // Reading back by location returns the same record.
        assert_eq!(w.reader.read(locs[9]).unwrap(), enq(10));
        w.close();
        let (_, recs) = replay(dir.path(), &seen);
        assert_eq!(recs, (1..=50).map(enq).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_cut_drops_what_follows_it_in_every_segment_and_appends_go_on_there() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Seen::default());
        let w =
            LogWriter::open(dir.path(), &[], 0, options(200), seen.clone(), "t".into()).unwrap();
        let mut locs = Vec::new();
        for seq in 1..=6 {
            let (tx, rx) = oneshot::channel();
            w.append(frame(&enq(seq)), Some(tx));
            locs.push(rx.await.unwrap().unwrap());
        }
        assert!(
            locs[5].segment > locs[2].segment,
            "the records span segments"
        );
        w.truncate(locs[2].segment, locs[2].offset).await.unwrap();
        assert_eq!(w.active_segment(), locs[2].segment);
        let (tx, rx) = oneshot::channel();
        w.append(frame(&enq(7)), Some(tx));
        let at = rx.await.unwrap().unwrap();
        assert_eq!((at.segment, at.offset), (locs[2].segment, locs[2].offset));
        w.close();
        let (_, recs) = replay(dir.path(), &seen);
        assert_eq!(recs, vec![enq(1), enq(2), enq(7)]);
    }

    /// A log of 200-byte segments holding enqueues 1 to 6, two or so per segment.
    async fn six_records_over_segments(dir: &Path, seen: &Arc<Seen>) -> LogWriter {
        let w = LogWriter::open(dir, &[], 0, options(200), seen.clone(), "t".into()).unwrap();
        for seq in 1..=6 {
            let (tx, rx) = oneshot::channel();
            w.append(frame(&enq(seq)), Some(tx));
            rx.await.unwrap().unwrap();
        }
        w
    }

    #[tokio::test]
    async fn segments_roll_and_settled_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Seen::default());
        let w = six_records_over_segments(dir.path(), &seen).await;
        let before = list_segments(dir.path()).unwrap();
        assert!(before.len() >= 3, "{before:?}");
        w.delete_below(w.active_segment());
        let (tx, rx) = oneshot::channel();
        w.append(
            frame(&Record::Settle {
                seq: 1,
                reason: SettleReason::Acked,
            }),
            Some(tx),
        );
        rx.await.unwrap().unwrap();
        // Deletion runs after the group's answers: wait for it.
        let mut after = list_segments(dir.path()).unwrap();
        for _ in 0..100 {
            if after.len() < before.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            after = list_segments(dir.path()).unwrap();
        }
        let active = w.active_segment();
        assert!(
            after.iter().all(|&s| s >= *before.last().unwrap()),
            "{after:?}"
        );
        assert!(after.contains(&active));
        // And their space is freed: no file is left on its way out.
        for _ in 0..250 {
            let leftovers = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    let path = e.as_ref().unwrap().path();
                    path.extension().is_some_and(|x| x == "deleting")
                })
                .count();
            if leftovers == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("deleted segments were left on the volume");
    }

    #[tokio::test]
    async fn a_segment_whose_deletion_a_crash_cut_short_is_not_replayed_and_goes() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Seen::default());
        let w = six_records_over_segments(dir.path(), &seen).await;
        w.close();
        let (segments, _) = replay(dir.path(), &seen);
        assert!(segments.len() >= 3, "{segments:?}");
        // The crash came after the oldest segment was renamed out of the log, before
        // its space was freed.
        let oldest = segment_path(dir.path(), segments[0]);
        let doomed = oldest.with_extension("deleting");
        std::fs::rename(&oldest, &doomed).unwrap();
        let mut recs = Vec::new();
        let (left, report) = recover(dir.path(), &*seen, |r, _| recs.push(r)).unwrap();
        assert_eq!(left, segments[1..]);
        let first = 7 - recs.len() as u64;
        assert!(first > 1, "the renamed segment was replayed: {recs:?}");
        assert_eq!(recs, (first..=6).map(enq).collect::<Vec<_>>());
        let _w = LogWriter::open(
            dir.path(),
            &left,
            report.end,
            options(200),
            seen,
            "t".into(),
        )
        .unwrap();
        for _ in 0..250 {
            if !doomed.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} was left behind", doomed.display());
    }

    #[test]
    fn a_flipped_byte_costs_one_record_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = Vec::new();
        let mut starts = Vec::new();
        for seq in 1..=5 {
            starts.push(data.len());
            data.extend_from_slice(&frame(&enq(seq)));
        }
        data[starts[2] + 20] ^= 0xff;
        std::fs::write(segment_path(dir.path(), 0), &data).unwrap();
        let seen = Seen::default();
        let (_, recs) = replay(dir.path(), &seen);
        assert_eq!(recs, vec![enq(1), enq(2), enq(4), enq(5)]);
        let damage = seen.damage.lock().unwrap();
        assert_eq!(damage.len(), 1);
        assert_eq!(damage[0].1, starts[2] as u64);
    }

    #[test]
    fn every_torn_tail_is_cut_and_keeps_what_came_before() {
        let mut whole = Vec::new();
        for seq in 1..=3 {
            whole.extend_from_slice(&frame(&enq(seq)));
        }
        let last_start = whole.len() - frame(&enq(3)).len();
        for cut in last_start..whole.len() {
            let dir = tempfile::tempdir().unwrap();
            let path = segment_path(dir.path(), 0);
            std::fs::write(&path, &whole[..cut]).unwrap();
            let seen = Seen::default();
            let (_, recs) = replay(dir.path(), &seen);
            assert_eq!(recs, vec![enq(1), enq(2)], "cut at {cut}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), last_start as u64);
        }
    }

    /// Appends `seqs` through a writer opened on what recovery of `dir` found, and
    /// waits for each to be durable.
    async fn append_after_recovery(dir: &Path, seqs: std::ops::RangeInclusive<u64>) {
        let seen = Arc::new(Seen::default());
        let (segments, report) = recover(dir, seen.as_ref(), |_, _| {}).unwrap();
        let w = LogWriter::open(
            dir,
            &segments,
            report.end,
            options(1 << 20),
            seen,
            "t".into(),
        )
        .unwrap();
        for seq in seqs {
            let (tx, rx) = oneshot::channel();
            w.append(frame(&enq(seq)), Some(tx));
            rx.await.unwrap().unwrap();
        }
        w.close();
    }

    #[tokio::test]
    async fn appends_land_in_allocated_space_and_recovery_stops_at_its_zeros() {
        let dir = tempfile::tempdir().unwrap();
        append_after_recovery(dir.path(), 1..=20).await;
        let written: u64 = (1..=20).map(|s| frame(&enq(s)).len() as u64).sum();
        let path = segment_path(dir.path(), 0);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(
            size > written,
            "allocated ahead: file {size} B for {written} B of records"
        );
        let seen = Seen::default();
        let mut recs = Vec::new();
        let (_, report) = recover(dir.path(), &seen, |r, _| recs.push(r)).unwrap();
        assert_eq!(recs, (1..=20).map(enq).collect::<Vec<_>>());
        assert_eq!(report.end, written, "the records end where the zeros begin");
        assert!(
            seen.damage.lock().unwrap().is_empty(),
            "zeros are not damage"
        );
        assert_eq!(report.torn_tail, 0);
        // A restarted writer continues at the end of the records, not of the file.
        append_after_recovery(dir.path(), 21..=30).await;
        let (_, recs) = replay(dir.path(), &seen);
        assert_eq!(recs, (1..=30).map(enq).collect::<Vec<_>>());
        assert!(seen.damage.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_torn_write_in_allocated_space_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        append_after_recovery(dir.path(), 1..=3).await;
        let path = segment_path(dir.path(), 0);
        let written: u64 = (1..=3).map(|s| frame(&enq(s)).len() as u64).sum();
        // Half a frame of garbage after the records, zeros after it.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9], written)
            .unwrap();
        drop(f);
        let seen = Seen::default();
        let mut recs = Vec::new();
        let (_, report) = recover(dir.path(), &seen, |r, _| recs.push(r)).unwrap();
        assert_eq!(recs, (1..=3).map(enq).collect::<Vec<_>>());
        assert_eq!(report.end, written);
        assert!(report.torn_tail > 0, "the torn write is cut");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), written);
        append_after_recovery(dir.path(), 4..=5).await;
        let (_, recs) = replay(dir.path(), &seen);
        assert_eq!(recs, (1..=5).map(enq).collect::<Vec<_>>());
    }
}
