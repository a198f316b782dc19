//! The usage journal: every usage record, and what it charged from which
//! lease, made durable on local disk before the settle or charge that made
//! it is acknowledged, then applied to Redis (which debits the account and
//! adds the record to the usage stream in one commit) and deleted.
//!
//! **Format.** Segments `DIR/{first seq:020}.tgj`, each an 8-byte header
//! (`TGJ1`, then the format version as a little-endian `u32`) followed by
//! entries: a little-endian `u32` payload length, the CRC-32C of the
//! payload (`u32`), and the payload, one [`Entry`] as JSON. `DIR/journal-id`
//! names the journal: the identity under which its entries are applied, so
//! a restarted sidecar on the same directory continues where it stopped.
//!
//! **Durability** ([`SyncPolicy`]): `always` writes a batch and `fsync`s it
//! before acknowledging any of it; appends that arrive while a batch is
//! being written wait for the next one, so many concurrent settles share
//! one `fsync` (group commit). `interval` acknowledges after the write and
//! `fsync`s every N ms (a power loss can lose the last N ms). `none` leaves
//! flushing to the operating system (a crash of the host can lose records;
//! for tests and trials only).
//!
//! **Reading** never panics on a bad file. A torn tail (the last entry cut
//! short by a crash mid-write) is truncated and counted. Anything else (an
//! empty or headerless file, a wrong magic or version, a bad checksum or an
//! impossible length before the end) quarantines the segment: it is renamed
//! `*.quarantined`, kept, named in the log and counted, and start-up stops
//! or goes on without it as configured.
//!
//! Why one file: the format, the writer thread and the applied-segment
//! bookkeeping share one lock and one on-disk invariant (no number handed
//! out twice); about 850 lines, the rest tests.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::ids::ProducerId;
use crate::engine::role::Journaled;

/// The first bytes of every segment.
pub const MAGIC: &[u8; 4] = b"TGJ1";
/// The format version after the magic.
pub const VERSION: u32 = 1;
const HEADER: usize = 8;
/// The largest payload an entry may have.
pub const MAX_ENTRY: usize = 1 << 20;

/// One journaled record and what it charged.
pub type Entry = Journaled;

/// When an appended entry counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// `fsync` before acknowledging (group commit).
    Always,
    /// `fsync` every interval; acknowledge after the write.
    Interval(Duration),
    /// Never `fsync` (unsafe: for tests and trials).
    None,
}

/// What to do with a corrupt segment at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCorrupt {
    /// Quarantine it and refuse to start.
    Stop,
    /// Quarantine it and start without it.
    Continue,
}

/// Journal settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSettings {
    /// The directory.
    pub dir: PathBuf,
    /// Durability.
    pub sync: SyncPolicy,
    /// A segment is closed once it reaches this size.
    pub segment_bytes: u64,
    /// Appends are refused once the segments take this much.
    pub max_bytes: u64,
    /// Corrupt segments at start-up.
    pub on_corrupt: OnCorrupt,
    /// Applied segments are moved to `DIR/archive` instead of deleted.
    pub archive: bool,
}

/// Why the journal refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// The disk bound is reached.
    #[error("the usage journal is full ({used} of {max} bytes): settles are refused until Redis takes the backlog")]
    Full {
        /// Bytes in use.
        used: u64,
        /// The bound.
        max: u64,
    },
    /// Reading or writing failed.
    #[error("usage journal: {0}")]
    Io(String),
    /// A corrupt segment stopped start-up.
    #[error("usage journal: {0}")]
    Corrupt(String),
    /// Another process has the directory open.
    #[error("usage journal: {0}")]
    Locked(String),
}

fn io(context: impl std::fmt::Display, e: std::io::Error) -> JournalError {
    JournalError::Io(format!("{context}: {e}"))
}

/// How a segment's bytes ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Every byte is a whole entry.
    Clean,
    /// The last entry is cut short (or its checksum fails at the very
    /// end): the bytes from `at` on are a torn write.
    Torn {
        /// Where the torn entry starts.
        at: usize,
    },
    /// Not a journal segment, or damaged before its end.
    Corrupt {
        /// Where.
        at: usize,
        /// What.
        why: String,
    },
}

/// Decodes a segment's bytes: the entries before any damage, and how the
/// bytes ended. Never panics, whatever the input (see `fuzz/`).
pub fn decode(bytes: &[u8]) -> (Vec<Entry>, Ending) {
    let corrupt = |at: usize, why: &str| Ending::Corrupt {
        at,
        why: why.to_owned(),
    };
    if bytes.len() < HEADER {
        return (Vec::new(), corrupt(0, "shorter than the segment header"));
    }
    if &bytes[..4] != MAGIC {
        return (Vec::new(), corrupt(0, "not a journal segment (wrong magic)"));
    }
    let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if version != VERSION {
        return (
            Vec::new(),
            corrupt(4, &format!("format version {version}, expected {VERSION}")),
        );
    }
    let mut entries = Vec::new();
    let mut at = HEADER;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < 8 {
            return (entries, Ending::Torn { at });
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 || len > MAX_ENTRY {
            return (entries, corrupt(at, &format!("impossible entry length {len}")));
        }
        let Some(payload) = rest.get(8..8 + len) else {
            return (entries, Ending::Torn { at });
        };
        let last = at + 8 + len == bytes.len();
        if crc32c::crc32c(payload) != crc {
            return if last {
                (entries, Ending::Torn { at })
            } else {
                (entries, corrupt(at, "checksum mismatch"))
            };
        }
        match serde_json::from_slice::<Entry>(payload) {
            Ok(entry) => entries.push(entry),
            Err(e) => return (entries, corrupt(at, &format!("unreadable entry: {e}"))),
        }
        at += 8 + len;
    }
    (entries, Ending::Clean)
}

/// Encodes one entry, framed.
pub fn encode(entry: &Entry) -> Vec<u8> {
    let payload = serde_json::to_vec(entry).unwrap_or_default();
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn header() -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(MAGIC);
    h[4..].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Counts of what start-up found, for logs and metrics.
#[derive(Debug, Default)]
pub struct Found {
    /// Torn tails truncated.
    pub torn: AtomicU64,
    /// Segments quarantined.
    pub quarantined: AtomicU64,
}

/// A closed or open segment: its first sequence number, path and size, and
/// how many of its entries are not applied yet.
#[derive(Debug, Clone)]
struct Segment {
    first: u64,
    path: PathBuf,
    bytes: u64,
    pending: usize,
}

/// What the writer and the appliers share.
struct Shared {
    /// Segments, oldest first; the last is the one written to.
    segments: Vec<Segment>,
    /// Entries written and not yet applied, and the segment (by its first
    /// number) holding each.
    unapplied: HashMap<(ProducerId, u64), u64>,
    /// Numbers up to here are reserved on disk (`DIR/next-seq`): no number
    /// below it is ever handed out again, whatever happens to segments.
    reserved: u64,
}

/// Numbers reserved on disk at a time.
const RESERVE: u64 = 1 << 16;

/// An append request: entries without sequence numbers yet, and where to
/// say they are durable.
struct Append {
    entries: Vec<Entry>,
    done: tokio::sync::oneshot::Sender<Result<(), JournalError>>,
}

/// What the writer thread is asked.
enum Request {
    Append(Append),
    /// Make what was written durable (under every policy) and stop.
    Close(tokio::sync::oneshot::Sender<Result<(), JournalError>>),
}

/// The writer thread's part of the journal. It holds no sender of its own
/// requests, so it sees the channel close once every handle is gone, and
/// no lock on the directory, so it may be opened again from then on.
struct Writer {
    settings: Arc<JournalSettings>,
    shared: Arc<Mutex<Shared>>,
    stats: Arc<WriteStats>,
}

/// The journal: appends go to one writer thread; appliers mark entries
/// applied and fully applied segments go away.
///
/// Entries are numbered by [`Journal::number`] before they are appended,
/// when the caller still holds its account: an account's entries are then
/// numbered in the order they were decided, whatever order concurrent
/// appends reach the disk in.
#[derive(Clone)]
pub struct Journal {
    id: ProducerId,
    next: Arc<AtomicU64>,
    settings: Arc<JournalSettings>,
    shared: Arc<Mutex<Shared>>,
    appends: std::sync::mpsc::Sender<Request>,
    /// What start-up found.
    pub found: Arc<Found>,
    /// What the writer did.
    pub stats: Arc<WriteStats>,
    /// The directory's lock, held while any handle but the writer's is
    /// (see [`lock`]).
    _lock: Option<Arc<File>>,
}

/// Counts of the writer's work.
#[derive(Debug, Default)]
pub struct WriteStats {
    /// Batches written (each one `fsync` under `always`).
    pub batches: AtomicU64,
    /// Entries written.
    pub entries: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// `fsync`s of written entries.
    pub syncs: AtomicU64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("id", &self.id)
            .field("dir", &self.settings.dir)
            .finish()
    }
}

/// `fsync`s the data of `f`, timed in the metrics.
fn timed_sync(f: &File) -> std::io::Result<()> {
    let started = std::time::Instant::now();
    let synced = f.sync_data();
    crate::telemetry::metrics::metrics()
        .journal_fsync
        .observe(started.elapsed().as_secs_f64());
    synced
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.tgj"))
}

impl Journal {
    /// Opens (or creates) the journal in `settings.dir`. Returns it and the
    /// entries written before and not known to be applied, in order: the
    /// caller replays them and marks what turns out applied already.
    pub fn open(settings: JournalSettings) -> Result<(Journal, Vec<Entry>), JournalError> {
        let dir = &settings.dir;
        fs::create_dir_all(dir).map_err(|e| io(dir.display(), e))?;
        let lock = lock(dir)?;
        let id = journal_id(dir)?;
        let found = Arc::new(Found::default());
        let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)
            .map_err(|e| io(dir.display(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "tgj"))
            .filter_map(|p| Some((p.file_stem()?.to_str()?.parse().ok()?, p)))
            .collect();
        names.sort();
        let mut segments = Vec::new();
        let mut pending = Vec::new();
        let mut unapplied = HashMap::new();
        let last_index = names.len().checked_sub(1);
        for (i, (first, path)) in names.into_iter().enumerate() {
            let bytes = fs::read(&path).map_err(|e| io(path.display(), e))?;
            let (entries, ending) = decode(&bytes);
            let newest = Some(i) == last_index;
            // A crash while creating the newest segment leaves it shorter
            // than its header, or a tail of zeros after preallocation: torn.
            let ending = match ending {
                Ending::Corrupt { at, .. }
                    if newest && (bytes.len() < HEADER || bytes[at..].iter().all(|b| *b == 0)) =>
                {
                    Ending::Torn {
                        at: at.max(HEADER).min(bytes.len()),
                    }
                }
                other => other,
            };
            if newest && bytes.len() < HEADER {
                tracing::warn!(segment = %path.display(), "a segment cut short at creation was removed");
                found.torn.fetch_add(1, Ordering::Relaxed);
                fs::remove_file(&path).map_err(|e| io(path.display(), e))?;
                continue;
            }
            let keep = match ending {
                Ending::Clean => bytes.len(),
                Ending::Torn { at } if newest => {
                    tracing::warn!(segment = %path.display(), offset = at, "torn tail of the usage journal truncated");
                    found.torn.fetch_add(1, Ordering::Relaxed);
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| io(path.display(), e))?;
                    file.set_len(at as u64).map_err(|e| io(path.display(), e))?;
                    file.sync_all().map_err(|e| io(path.display(), e))?;
                    at
                }
                Ending::Torn { at } | Ending::Corrupt { at, .. } => {
                    let why = match ending {
                        Ending::Corrupt { why, .. } => why,
                        _ => "cut short before the last segment".to_owned(),
                    };
                    let kept = path.with_extension("tgj.quarantined");
                    fs::rename(&path, &kept).map_err(|e| io(path.display(), e))?;
                    found.quarantined.fetch_add(1, Ordering::Relaxed);
                    let message = format!(
                        "segment {} is corrupt at byte {at} ({why}); kept as {}",
                        path.display(),
                        kept.display()
                    );
                    if settings.on_corrupt == OnCorrupt::Stop {
                        return Err(JournalError::Corrupt(format!(
                            "{message}; start-up stopped (journal.on_corrupt = \"stop\"): inspect it, then \
                             move it away or set on_corrupt = \"continue\""
                        )));
                    }
                    tracing::error!(
                        "{message}; {} entries before the damage are replayed, the rest are not",
                        entries.len()
                    );
                    pending.extend(entries);
                    continue;
                }
            };
            for e in &entries {
                unapplied.insert((e.journal.clone(), e.seq), first);
            }
            segments.push(Segment {
                first,
                path,
                bytes: keep as u64,
                pending: entries.len(),
            });
            pending.extend(entries);
        }
        // Numbers go on above the reservation on disk, so none is ever
        // handed out twice under one id, whatever happened to segments
        // (quarantined, moved away, lost with a tail never synced). Without
        // a reservation (a first start, or the file lost) a fresh id starts
        // a fresh series.
        let (id, floor) = match read_reservation(dir)? {
            Some(floor) => (id, floor),
            None => (new_journal_id(dir)?, 1),
        };
        let next = pending
            .iter()
            .filter(|e| e.journal == id)
            .map(|e| e.seq + 1)
            .chain(segments.last().map(|s| s.first))
            .fold(floor.max(1), u64::max);
        write_reservation(dir, next + RESERVE)?;
        let shared = Arc::new(Mutex::new(Shared {
            segments,
            unapplied,
            reserved: next + RESERVE,
        }));
        let (appends, rx) = std::sync::mpsc::channel();
        let journal = Journal {
            id,
            next: Arc::new(AtomicU64::new(next)),
            settings: Arc::new(settings),
            shared,
            appends,
            found,
            stats: Arc::new(WriteStats::default()),
            _lock: Some(Arc::new(lock)),
        };
        let writer = Writer {
            settings: Arc::clone(&journal.settings),
            shared: Arc::clone(&journal.shared),
            stats: Arc::clone(&journal.stats),
        };
        std::thread::Builder::new()
            .name("tollgate-journal".into())
            .spawn(move || writer.write_loop(rx))
            .map_err(|e| io("starting the journal writer", e))?;
        Ok((journal, pending))
    }

    /// This journal's identity.
    pub fn id(&self) -> &ProducerId {
        &self.id
    }

    /// Names the journal and the next sequence numbers on `entries`. Past
    /// the reservation on disk, reserves more first (one small `fsync`
    /// every 65,536 numbers).
    pub fn number(&self, entries: &mut [Entry]) -> Result<(), JournalError> {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let needed = self.next.load(Ordering::Relaxed) + entries.len() as u64;
        if needed > shared.reserved {
            write_reservation(&self.settings.dir, needed + RESERVE)?;
            shared.reserved = needed + RESERVE;
        }
        for entry in entries {
            entry.journal = self.id.clone();
            entry.seq = self.next.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Appends numbered `entries` (handed to the writer at once) and
    /// returns what resolves once they are durable under the sync policy.
    pub fn append(&self, entries: Vec<Entry>) -> impl Future<Output = Result<(), JournalError>> + use<> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let sent = self.appends.send(Request::Append(Append { entries, done }));
        // Every policy waits for the write itself: that is also what keeps
        // callers from outrunning the writer.
        async move {
            sent.map_err(|_| JournalError::Io("the journal writer has stopped".into()))?;
            wait.await
                .map_err(|_| JournalError::Io("the journal writer has stopped".into()))?
        }
    }

    /// Makes what was written durable, whatever the sync policy, and stops
    /// the writer: later appends fail. Shutdown calls it once the last
    /// reports are made. (Dropping every handle syncs and stops it too.)
    pub fn close(&self) -> impl Future<Output = Result<(), JournalError>> + use<> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let sent = self.appends.send(Request::Close(done));
        async move {
            sent.map_err(|_| JournalError::Io("the journal writer has stopped".into()))?;
            wait.await
                .map_err(|_| JournalError::Io("the journal writer has stopped".into()))?
        }
    }

    /// Marks entries (journal id, number) applied; segments with nothing
    /// unapplied left, other than the one being written, are deleted (or
    /// archived).
    pub fn applied(&self, entries: impl IntoIterator<Item = (ProducerId, u64)>) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        for key in entries {
            if let Some(first) = shared.unapplied.remove(&key)
                && let Some(s) = shared.segments.iter_mut().find(|s| s.first == first)
            {
                s.pending = s.pending.saturating_sub(1);
            }
        }
        let newest = shared.segments.last().map(|s| s.first);
        let (done, kept): (Vec<Segment>, Vec<Segment>) = std::mem::take(&mut shared.segments)
            .into_iter()
            .partition(|s| s.pending == 0 && Some(s.first) != newest);
        shared.segments = kept;
        drop(shared);
        for segment in done {
            let result = if self.settings.archive {
                let archive = self.settings.dir.join("archive");
                fs::create_dir_all(&archive).and_then(|()| {
                    fs::rename(
                        &segment.path,
                        archive.join(segment.path.file_name().unwrap_or_default()),
                    )
                })
            } else {
                fs::remove_file(&segment.path)
            };
            if let Err(e) = result {
                tracing::warn!(segment = %segment.path.display(), error = %e, "applied journal segment not removed");
            }
        }
    }

    /// Whether appends are taken now (the disk bound is not reached).
    pub fn has_room(&self) -> Result<(), JournalError> {
        let used = self.bytes();
        if used >= self.settings.max_bytes {
            return Err(JournalError::Full {
                used,
                max: self.settings.max_bytes,
            });
        }
        Ok(())
    }

    /// Bytes the segments take.
    pub fn bytes(&self) -> u64 {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.segments.iter().map(|s| s.bytes).sum()
    }

    /// Entries written and not yet applied.
    pub fn backlog(&self) -> usize {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).unapplied.len()
    }
}

impl Writer {
    fn write_loop(self, rx: std::sync::mpsc::Receiver<Request>) {
        let mut file: Option<File> = None;
        let mut synced = std::time::Instant::now();
        let mut dirty = false;
        loop {
            let request = match self.settings.sync {
                SyncPolicy::Interval(every) => match rx.recv_timeout(every) {
                    Ok(r) => Some(r),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        let _ = self.last_sync(file.as_ref(), dirty);
                        return;
                    }
                },
                _ => match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => {
                        let _ = self.last_sync(file.as_ref(), dirty);
                        return;
                    }
                },
            };
            match request {
                Some(Request::Append(first)) => {
                    // Everything queued meanwhile shares this write and its
                    // fsync (up to a close, answered after it).
                    let mut batch = vec![first];
                    let mut close = None;
                    while let Ok(more) = rx.try_recv() {
                        match more {
                            Request::Append(more) => batch.push(more),
                            Request::Close(done) => {
                                close = Some(done);
                                break;
                            }
                        }
                    }
                    match self.write_batch(&mut file, &mut batch) {
                        Ok(()) => {
                            dirty = dirty || self.settings.sync != SyncPolicy::Always;
                            self.stats.batches.fetch_add(1, Ordering::Relaxed);
                            for append in batch {
                                self.stats
                                    .entries
                                    .fetch_add(append.entries.len() as u64, Ordering::Relaxed);
                                let _ = append.done.send(Ok(()));
                            }
                        }
                        Err(e) => {
                            for append in batch {
                                let _ = append.done.send(Err(e.clone()));
                            }
                            file = None;
                        }
                    }
                    if let Some(done) = close {
                        let _ = done.send(self.last_sync(file.as_ref(), dirty));
                        return;
                    }
                }
                Some(Request::Close(done)) => {
                    let _ = done.send(self.last_sync(file.as_ref(), dirty));
                    return;
                }
                None => {}
            }
            // `interval`: at most that long between a write and its fsync,
            // however busy the writer is.
            if let SyncPolicy::Interval(every) = self.settings.sync
                && dirty
                && synced.elapsed() >= every
                && let Some(f) = &file
            {
                if let Err(e) = timed_sync(f) {
                    tracing::error!(error = %e, "usage journal fsync failed");
                }
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                synced = std::time::Instant::now();
                dirty = false;
            }
        }
    }

    /// The writer stops: what was written and not synced is synced now,
    /// whatever the policy.
    fn last_sync(&self, file: Option<&File>, dirty: bool) -> Result<(), JournalError> {
        let Some(f) = file.filter(|_| dirty) else {
            return Ok(());
        };
        let synced = timed_sync(f).map_err(|e| io("syncing the usage journal at close", e));
        if let Err(e) = &synced {
            tracing::error!(error = %e, "usage journal fsync at close failed");
        }
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        synced
    }

    /// Writes every entry of `batch`, syncing as the policy says. A failed
    /// write is cut off again, so the segment never keeps half an entry.
    fn write_batch(&self, file: &mut Option<File>, batch: &mut [Append]) -> Result<(), JournalError> {
        // Encode before taking the lock: `number` (on the decision path)
        // takes it too, and must never wait for this writer's work.
        let mut bytes = Vec::new();
        let mut first_seq = u64::MAX;
        for append in batch.iter() {
            for entry in &append.entries {
                first_seq = first_seq.min(entry.seq);
                bytes.extend_from_slice(&encode(entry));
            }
        }
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let used: u64 = shared.segments.iter().map(|s| s.bytes).sum();
        if used + bytes.len() as u64 > self.settings.max_bytes {
            return Err(JournalError::Full {
                used,
                max: self.settings.max_bytes,
            });
        }
        let full = shared
            .segments
            .last()
            .is_none_or(|s| s.bytes >= self.settings.segment_bytes);
        if full || file.is_none() {
            let path = match shared.segments.last() {
                // Reopen the open segment after a restart or an error.
                Some(s) if !full => s.path.clone(),
                _ => {
                    // The segment being closed is made durable first.
                    if let Some(f) = file.as_ref()
                        && self.settings.sync != SyncPolicy::None
                    {
                        f.sync_data().map_err(|e| io("closing a journal segment", e))?;
                    }
                    let path = segment_path(&self.settings.dir, first_seq);
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map_err(|e| io(path.display(), e))?;
                    f.write_all(&header()).map_err(|e| io(path.display(), e))?;
                    f.sync_all().map_err(|e| io(path.display(), e))?;
                    if let Ok(d) = File::open(&self.settings.dir) {
                        let _ = d.sync_all();
                    }
                    shared.segments.push(Segment {
                        first: first_seq,
                        path: path.clone(),
                        bytes: HEADER as u64,
                        pending: 0,
                    });
                    path
                }
            };
            *file = Some(
                OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(|e| io(path.display(), e))?,
            );
        }
        let f = file
            .as_mut()
            .ok_or_else(|| JournalError::Io("no open segment".into()))?;
        let (path, before) = shared
            .segments
            .last()
            .map(|s| (s.path.clone(), s.bytes))
            .unwrap_or_default();
        // The write and its fsync happen without the lock (only this
        // thread writes, and the newest segment is never removed).
        drop(shared);
        let written = f.write_all(&bytes).and_then(|()| match self.settings.sync {
            SyncPolicy::Always => timed_sync(f),
            _ => Ok(()),
        });
        if let Err(e) = written {
            // Cut the partial write off, so the next entry follows a whole one.
            let _ = f.set_len(before);
            return Err(io(path.display(), e));
        }
        if self.settings.sync == SyncPolicy::Always {
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let segment_first = shared.segments.last().map_or(0, |s| s.first);
        let mut count = 0;
        for append in batch.iter() {
            for entry in &append.entries {
                shared
                    .unapplied
                    .insert((entry.journal.clone(), entry.seq), segment_first);
                count += 1;
            }
        }
        if let Some(s) = shared.segments.last_mut() {
            s.bytes += bytes.len() as u64;
            s.pending += count;
        }
        Ok(())
    }
}

/// The number reservation in `DIR/next-seq`, if there is one.
fn read_reservation(dir: &Path) -> Result<Option<u64>, JournalError> {
    let path = dir.join("next-seq");
    match fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| JournalError::Corrupt(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path.display(), e)),
    }
}

/// Reserves numbers below `next` durably (write, fsync, rename, fsync dir).
fn write_reservation(dir: &Path, next: u64) -> Result<(), JournalError> {
    let (tmp, path) = (dir.join("next-seq.tmp"), dir.join("next-seq"));
    let mut f = File::create(&tmp).map_err(|e| io(tmp.display(), e))?;
    f.write_all(next.to_string().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io(tmp.display(), e))?;
    fs::rename(&tmp, &path).map_err(|e| io(path.display(), e))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Takes `dir`'s exclusive lock (`flock` on `dir/lock`, which names the
/// holder's pid): two processes on one journal would number records
/// alike, and the later ones would be skipped as already applied.
fn lock(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io(path.display(), e))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).map_err(|e| io(path.display(), e))?;
            write!(file, "{}", std::process::id()).map_err(|e| io(path.display(), e))?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(JournalError::Locked(format!(
                "{} is in use by another process (pid {}): each sidecar needs a journal directory of its own",
                dir.display(),
                holder.trim()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(path.display(), e)),
    }
}

/// The journal's identity, kept in `journal-id` (created on first use).
fn journal_id(dir: &Path) -> Result<ProducerId, JournalError> {
    let path = dir.join("journal-id");
    let mut text = String::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_string(&mut text).map_err(|e| io(path.display(), e))?;
            ProducerId::parse(text.trim()).map_err(|e| JournalError::Corrupt(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_journal_id(dir),
        Err(e) => Err(io(path.display(), e)),
    }
}

/// A new identity, written to `journal-id` atomically.
fn new_journal_id(dir: &Path) -> Result<ProducerId, JournalError> {
    let text = format!(
        "journal-{}-{:08x}",
        jiff::Timestamp::now().as_millisecond(),
        fastrand::u32(..)
    );
    let (tmp, path) = (dir.join("journal-id.tmp"), dir.join("journal-id"));
    fs::write(&tmp, &text).map_err(|e| io(tmp.display(), e))?;
    fs::rename(&tmp, &path).map_err(|e| io(path.display(), e))?;
    ProducerId::parse(&text).map_err(|e| JournalError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ids::{AccountId, RequestId};
    use crate::engine::money::Money;
    use crate::engine::pricing::Usage;
    use crate::engine::record::{RecordKind, UsageRecord};
    use crate::engine::source::{SourceRef, Take};

    fn settings(dir: &Path) -> JournalSettings {
        JournalSettings {
            dir: dir.to_path_buf(),
            sync: SyncPolicy::Always,
            segment_bytes: 4096,
            max_bytes: 1 << 20,
            on_corrupt: OnCorrupt::Stop,
            archive: false,
        }
    }

    fn entry(i: u64) -> Entry {
        let at: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        Entry {
            journal: ProducerId::parse("unnamed").unwrap(),
            seq: 0,
            record: UsageRecord {
                kind: RecordKind::Settle,
                request_id: RequestId::parse(&format!("r{i}")).unwrap(),
                reservation_id: None,
                account_id: AccountId::parse("acme").unwrap(),
                api_key_id: None,
                model: None,
                service_tier: None,
                usage: Usage::default(),
                charges: vec![],
                total_money: Money::from_picos(i128::from(i)),
                price_version: None,
                reserved_at: at,
                settled_at: at,
            },
            leased: vec![Take {
                source: SourceRef::Paid,
                amount: i128::from(i),
            }],
            unleased: vec![],
            producer: ProducerId::parse("p").unwrap(),
            epoch: 0,
        }
    }

    /// Appends `n` entries, ten at a time.
    async fn write(journal: &Journal, n: u64) -> Vec<Entry> {
        let mut entries: Vec<Entry> = (1..=n).map(entry).collect();
        journal.number(&mut entries).unwrap();
        for chunk in entries.chunks(10) {
            journal.append(chunk.to_vec()).await.unwrap();
        }
        entries
    }

    fn segments(dir: &Path, extension: &str) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(extension))
            .collect();
        found.sort();
        found
    }

    /// `close` makes what was written durable whatever the policy (an
    /// `interval` one an hour long, or none at all), and appends after it
    /// fail rather than wait for a writer that is gone.
    #[tokio::test]
    async fn close_syncs_what_was_written_under_every_policy() {
        for sync in [
            SyncPolicy::Always,
            SyncPolicy::Interval(Duration::from_secs(3600)),
            SyncPolicy::None,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (journal, _) = Journal::open(JournalSettings {
                sync,
                ..settings(dir.path())
            })
            .unwrap();
            write(&journal, 3).await;
            journal.close().await.unwrap();
            assert!(journal.stats.syncs.load(Ordering::Relaxed) >= 1, "{sync:?}: synced");
            let mut late = vec![entry(4)];
            journal.number(&mut late).unwrap();
            assert!(journal.append(late).await.is_err(), "{sync:?}: an append after close");
        }
    }

    /// The writer holds no sender of its own requests: once every handle is
    /// gone it sees the channel closed, syncs what it wrote and stops (it
    /// waited for requests forever, holding what an `interval` policy had
    /// not synced yet).
    #[tokio::test]
    async fn the_writer_syncs_and_stops_once_every_handle_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(JournalSettings {
            sync: SyncPolicy::Interval(Duration::from_secs(3600)),
            ..settings(dir.path())
        })
        .unwrap();
        write(&journal, 3).await;
        let stats = Arc::clone(&journal.stats);
        assert_eq!(stats.syncs.load(Ordering::Relaxed), 0, "nothing synced within the hour");
        drop(journal);
        for _ in 0..250 {
            if stats.syncs.load(Ordering::Relaxed) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the writer did not sync once every handle was gone");
    }

    /// A second open of a directory in use is refused, naming the holder;
    /// once the first is gone, it opens.
    #[tokio::test]
    async fn a_journal_directory_is_opened_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(settings(dir.path())).unwrap();
        let err = Journal::open(settings(dir.path())).unwrap_err();
        let pid = std::process::id().to_string();
        assert!(
            matches!(&err, JournalError::Locked(m) if m.contains("in use by another process") && m.contains(&pid)),
            "{err}"
        );
        write(&journal, 3).await;
        drop(journal);
        let (again, pending) = Journal::open(settings(dir.path())).unwrap();
        assert_eq!(pending.len(), 3, "nothing the refused open touched");
        drop(again);
    }

    #[tokio::test]
    async fn what_was_appended_is_replayed_in_order_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, pending) = Journal::open(settings(dir.path())).unwrap();
        assert!(pending.is_empty());
        let written = write(&journal, 40).await;
        assert!(segments(dir.path(), ".tgj").len() > 1, "rotated at 4 KiB");
        let id = journal.id().clone();
        drop(journal);
        let (again, pending) = Journal::open(settings(dir.path())).unwrap();
        assert_eq!(again.id(), &id, "the same journal");
        assert_eq!(pending, written);
        let mut next = vec![entry(41)];
        again.number(&mut next).unwrap();
        assert!(
            next[0].seq > 40,
            "numbering goes on above the reservation: {}",
            next[0].seq
        );
    }

    #[tokio::test]
    async fn concurrent_appends_share_fsyncs_and_applied_segments_go() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(settings(dir.path())).unwrap();
        // 64 appends handed over together, as from 64 concurrent settles.
        let mut waits = Vec::new();
        let mut seqs = Vec::new();
        for i in 0..64 {
            let mut e = vec![entry(i + 1)];
            journal.number(&mut e).unwrap();
            seqs.push(e[0].seq);
            waits.push(journal.append(e));
        }
        for wait in waits {
            wait.await.unwrap();
        }
        let batches = journal.stats.batches.load(Ordering::Relaxed);
        assert_eq!(journal.stats.entries.load(Ordering::Relaxed), 64);
        assert!(batches < 64, "group commit: {batches} fsyncs for 64 appends");
        assert_eq!(journal.backlog(), 64);
        let before = segments(dir.path(), ".tgj").len();
        journal.applied(seqs.into_iter().map(|s| (journal.id().clone(), s)));
        assert_eq!(journal.backlog(), 0);
        let after = segments(dir.path(), ".tgj").len();
        assert_eq!(after, 1, "every applied segment but the newest is gone (from {before})");
    }

    #[tokio::test]
    async fn a_torn_tail_is_truncated_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(settings(dir.path())).unwrap();
        let written = write(&journal, 3).await;
        drop(journal);
        let last = segments(dir.path(), ".tgj").pop().unwrap();
        let len = fs::metadata(&last).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let (journal, pending) = Journal::open(settings(dir.path())).unwrap();
        assert_eq!(
            pending,
            written[..2].to_vec(),
            "the torn entry is gone, the rest is kept"
        );
        assert_eq!(journal.found.torn.load(Ordering::Relaxed), 1);
        let (entries, ending) = decode(&fs::read(&last).unwrap());
        assert_eq!((entries.len(), ending), (2, Ending::Clean), "truncated on disk");
    }

    #[tokio::test]
    async fn a_corrupt_middle_quarantines_the_segment_and_stops_or_continues() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(settings(dir.path())).unwrap();
        write(&journal, 3).await;
        let old_id = journal.id().clone();
        drop(journal);
        let seg = segments(dir.path(), ".tgj").pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        bytes[HEADER + 20] ^= 0xff; // inside the first entry's payload
        fs::write(&seg, &bytes).unwrap();
        let err = Journal::open(settings(dir.path())).unwrap_err();
        assert!(
            matches!(&err, JournalError::Corrupt(m) if m.contains("checksum") && m.contains("quarantined")),
            "{err}"
        );
        assert_eq!(segments(dir.path(), ".quarantined").len(), 1, "kept on disk");
        // Moved away by an operator, then started: numbers never repeat.
        let (moved, _) = Journal::open(settings(dir.path())).unwrap();
        let mut next = vec![entry(8)];
        moved.number(&mut next).unwrap();
        assert!(next[0].seq > 3, "{}", next[0].seq);
        drop(moved);
        // Put it back and start anyway.
        fs::rename(segments(dir.path(), ".quarantined").pop().unwrap(), &seg).unwrap();
        let mut go_on = settings(dir.path());
        go_on.on_corrupt = OnCorrupt::Continue;
        let (journal, pending) = Journal::open(go_on).unwrap();
        assert!(pending.is_empty(), "nothing before the damage");
        assert_eq!(journal.found.quarantined.load(Ordering::Relaxed), 1);
        assert_eq!(journal.id(), &old_id);
        let mut next = vec![entry(9)];
        journal.number(&mut next).unwrap();
        assert!(
            next[0].seq > 3,
            "numbers go on above every one handed out: {}",
            next[0].seq
        );
    }

    #[tokio::test]
    async fn bad_files_are_quarantined_never_read_as_entries() {
        let cases: [(&str, Vec<u8>); 5] = [
            ("empty", vec![]),
            ("wrong magic", b"XXXX\x01\x00\x00\x00".to_vec()),
            ("wrong version", b"TGJ1\x07\x00\x00\x00".to_vec()),
            (
                "impossible length",
                [&header()[..], &[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 1]].concat(),
            ),
            (
                "random bytes",
                (0..4096u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect(),
            ),
        ];
        for (name, bytes) in cases {
            let (entries, ending) = decode(&bytes);
            assert!(entries.is_empty(), "{name}");
            assert!(matches!(ending, Ending::Corrupt { .. }), "{name}: {ending:?}");
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(format!("{:020}.tgj", 1)), &bytes).unwrap();
            fs::write(dir.path().join(format!("{:020}.tgj", 2)), header()).unwrap();
            assert!(Journal::open(settings(dir.path())).is_err(), "{name} stops start-up");
        }
    }

    #[tokio::test]
    async fn a_full_journal_refuses_appends_and_archives_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut small = settings(dir.path());
        small.max_bytes = 8192;
        small.archive = true;
        let (journal, _) = Journal::open(small).unwrap();
        let mut refused = None;
        let mut seqs = Vec::new();
        for i in 1..200 {
            let mut e = vec![entry(i)];
            journal.number(&mut e).unwrap();
            match journal.append(e.clone()).await {
                Ok(()) => seqs.push(e[0].seq),
                Err(err) => {
                    refused = Some(err);
                    break;
                }
            }
        }
        assert!(matches!(refused, Some(JournalError::Full { .. })), "{refused:?}");
        assert!(journal.has_room().is_err() || journal.bytes() > 4096);
        journal.applied(seqs.into_iter().map(|s| (journal.id().clone(), s)));
        assert!(
            !segments(&dir.path().join("archive"), ".tgj").is_empty(),
            "applied segments archived"
        );
        assert!(journal.has_room().is_ok(), "room again once applied");
    }

    /// Every seed of the fuzz corpus (`fuzz/corpus/journal_decode`) decodes
    /// without panicking, to what its name says.
    #[test]
    fn the_fuzz_seed_corpus_decodes_as_named() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/journal_decode");
        let mut seen = 0;
        for file in fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let (entries, ending) = decode(&fs::read(&path).unwrap());
            seen += 1;
            match name.as_str() {
                "valid-two-entries" => assert_eq!((entries.len(), ending), (2, Ending::Clean)),
                "header-only" => assert_eq!((entries.len(), ending), (0, Ending::Clean)),
                "torn-tail" => assert_eq!((entries.len(), ending), (1, Ending::Torn { at: entries_end(&path) })),
                _ => assert!(matches!(ending, Ending::Corrupt { .. }), "{name}: {ending:?}"),
            }
        }
        assert!(seen >= 9, "the seed corpus is there ({seen} files)");
    }

    /// Where the first entry of a seed ends (the torn one starts there).
    fn entries_end(path: &Path) -> usize {
        let bytes = fs::read(path).unwrap();
        let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        HEADER + 8 + len
    }
}
