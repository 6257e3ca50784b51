//! Logs of user services: every line a service writes to stdout or stderr,
//! stamped, numbered and tagged, kept in a bounded in-memory tail, sent to
//! followers at once, and handed to the [`writer`] thread, which appends it
//! to the service's file on the data disk, rotates by size and `fsync`s
//! every `sync_interval_ms` (1 s) and at stop.
//!
//! What survives which crash: a line is in the file once the writer has
//! taken it (normally within microseconds), so a crash of the guest
//! *process* loses at most the queue; a crash of the VM or the host loses
//! at most the last `sync_interval_ms` — every line numbered up to
//! [`Logs::synced_seq`] (`GET /v1/status`, `logs.synced_seq`) is on the
//! disk. A service that logs faster than `rate_lines_per_s` (or while
//! `queue_lines` wait for the disk) has the excess dropped and *counted*:
//! the count is in its status and in a `system` line when it slows down.
//!
//! Files: `<dir>/<service>.log` (NDJSON, one [`LogLine`] per line), rotated
//! to `<service>.log.1` … `.N`. Queries read the files, so they answer
//! after a restart of the guest too.

mod writer;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::broadcast;

/// Longest line kept whole; longer ones are split.
const MAX_LINE: usize = 64 * 1024;

/// A line without its line end (`\n` or `\r\n`).
fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Errors of the log store.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file or directory could not be used.
    #[error("log file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The service name cannot be a file name.
    #[error("\"{0}\" cannot name a log (letters, digits and '-' only)")]
    BadName(String),
    /// The writer thread is gone (it only ends when the store does).
    #[error("the log writer has stopped")]
    Stopped,
}

/// Size, rate and durability limits (the guest configuration's `[logs]`).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogLimits {
    /// A service's current file is rotated past this size.
    pub max_file_bytes: u64,
    /// Rotated files kept per service.
    pub keep_files: usize,
    /// Lines kept in memory per service.
    pub tail_lines: usize,
    /// Lines per second a service may log, on average; the excess is
    /// dropped and counted.
    pub rate_lines_per_s: u32,
    /// Lines a service may log at once above its rate.
    pub burst_lines: u32,
    /// Lines waiting for the disk at most (all services); beyond, lines
    /// are dropped and counted.
    pub queue_lines: usize,
    /// How often written lines are `fsync`ed: what a VM crash may lose.
    pub sync_interval_ms: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 8 * 1024 * 1024,
            keep_files: 3,
            tail_lines: 1000,
            rate_lines_per_s: 20_000,
            burst_lines: 40_000,
            queue_lines: 65_536,
            sync_interval_ms: 1000,
        }
    }
}

pub use nestbox_api::types::{LogLine, Stream};

struct Service {
    name: Arc<str>,
    tail: VecDeque<LogLine>,
    live: broadcast::Sender<LogLine>,
    bucket: Bucket,
    /// Lines dropped in all (rate or queue).
    dropped: u64,
    /// Lines dropped since the last `system` line that said so.
    unreported: u64,
}

/// A token bucket: `rate` lines a second, `burst` at once.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, limits: &LogLimits, now: Instant) -> bool {
        let rate = f64::from(limits.rate_lines_per_s.max(1));
        let burst = f64::from(limits.burst_lines.max(1));
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Inner {
    dir: PathBuf,
    limits: LogLimits,
    services: Mutex<Services>,
    shared: Arc<writer::Shared>,
}

type Writer = std::sync::mpsc::Sender<writer::Op>;

struct Services {
    by_name: HashMap<String, Service>,
    /// The next line's number.
    next_seq: u64,
    /// To the writer thread.
    writer: Writer,
}

pub use nestbox_api::types::LogStats;

/// The log store; cheap to clone.
#[derive(Clone)]
pub struct Logs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Logs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logs")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `service`'s state, made on first use.
fn service_state<'a>(
    services: &'a mut HashMap<String, Service>,
    service: &str,
    limits: &LogLimits,
) -> &'a mut Service {
    services
        .entry(service.to_owned())
        .or_insert_with(|| Service {
            name: Arc::from(service),
            tail: VecDeque::new(),
            live: broadcast::channel(256).0,
            bucket: Bucket {
                tokens: f64::from(limits.burst_lines.max(1)),
                at: Instant::now(),
            },
            dropped: 0,
            unreported: 0,
        })
}

/// The highest line number in the files of `dir`: each current file's
/// last line (read from its end).
fn last_seq_in(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .filter_map(|e| {
            let mut f = std::fs::File::open(e.path()).ok()?;
            let len = f.metadata().ok()?.len();
            f.seek(std::io::SeekFrom::Start(
                len.saturating_sub(2 * MAX_LINE as u64),
            ))
            .ok()?;
            let mut tail = Vec::new();
            f.read_to_end(&mut tail).ok()?;
            String::from_utf8_lossy(&tail)
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<LogLine>(l).ok())
                .map(|l| l.seq)
        })
        .max()
        .unwrap_or(0)
}

fn check_name(name: &str) -> Result<(), LogError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(LogError::BadName(name.to_owned()));
    }
    Ok(())
}

impl Logs {
    /// A store in `dir` (created if missing).
    ///
    /// # Errors
    /// [`LogError::Io`] if the directory cannot be made.
    pub fn open(dir: &Path, limits: LogLimits) -> Result<Self, LogError> {
        let io = |source| LogError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let next_seq = last_seq_in(dir) + 1;
        let shared = Arc::new(writer::Shared::default());
        let writer = writer::start(dir.to_owned(), limits, shared.clone(), next_seq).map_err(io)?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                limits,
                services: Mutex::new(Services {
                    by_name: HashMap::new(),
                    next_seq,
                    writer,
                }),
                shared,
            }),
        })
    }

    fn file(&self, service: &str, n: usize) -> PathBuf {
        writer::file(&self.inner.dir, service, n)
    }

    /// Records one line now: in the tail, to followers, and to the writer
    /// thread for the disk. Never blocks: a line over the service's rate,
    /// or with the writer's queue full, is dropped and counted.
    pub fn record(&self, service: &str, stream: Stream, line: impl AsRef<str>) {
        self.record_lines(service, stream, std::iter::once(line.as_ref().as_bytes()));
    }

    /// Records several lines (bytes, lossily made UTF-8 once kept) with
    /// one lock and one look-up: what a chatty service's capture does with
    /// each chunk it reads. A line over the rate is dropped before it
    /// costs an allocation.
    pub fn record_lines<'a>(
        &self,
        service: &str,
        stream: Stream,
        lines: impl IntoIterator<Item = &'a [u8]>,
    ) {
        if check_name(service).is_err() {
            return;
        }
        let limits = &self.inner.limits;
        let mut services = self.inner.services.lock();
        let Services {
            by_name,
            next_seq,
            writer,
        } = &mut *services;
        let svc = service_state(by_name, service, limits);
        let now = Instant::now();
        for line in lines {
            let over_rate = stream != Stream::System && !svc.bucket.take(limits, now);
            let queue_full = self.inner.shared.queued.load(Ordering::Relaxed) >= limits.queue_lines;
            if over_rate || queue_full {
                svc.dropped += 1;
                svc.unreported += 1;
                continue;
            }
            if svc.unreported > 0 {
                let dropped = std::mem::take(&mut svc.unreported);
                let why = format!(
                    "{dropped} lines dropped: over {} lines/s, or the disk fell behind",
                    limits.rate_lines_per_s
                );
                self.push(svc, next_seq, writer, Stream::System, why);
            }
            let text = String::from_utf8_lossy(line).into_owned();
            self.push(svc, next_seq, writer, stream, text);
        }
    }

    /// Numbers, queues, keeps and sends one line.
    fn push(
        &self,
        svc: &mut Service,
        next_seq: &mut u64,
        writer: &Writer,
        stream: Stream,
        line: String,
    ) {
        let (shared, tail_lines) = (&self.inner.shared, self.inner.limits.tail_lines);
        let entry = LogLine {
            seq: *next_seq,
            ts_ms: now_ms(),
            service: svc.name.to_string(),
            stream,
            line,
        };
        *next_seq += 1;
        let mut json = serde_json::to_vec(&entry).expect("a log line serializes");
        json.push(b'\n');
        shared.queued.fetch_add(1, Ordering::Relaxed);
        let sent = writer.send(writer::Op::Line {
            service: svc.name.clone(),
            json,
            seq: entry.seq,
        });
        if sent.is_err() {
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            shared.failed.fetch_add(1, Ordering::Relaxed);
        }
        if svc.tail.len() >= tail_lines.max(1) {
            svc.tail.pop_front();
        }
        svc.tail.push_back(entry.clone());
        let _ = svc.live.send(entry);
    }

    /// Sends `op` made with a reply channel and waits for the reply
    /// (blocking: from `spawn_blocking` or a plain thread).
    fn ask(
        &self,
        op: impl FnOnce(std::sync::mpsc::Sender<()>) -> writer::Op,
    ) -> Result<(), LogError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner
            .services
            .lock()
            .writer
            .send(op(tx))
            .map_err(|_| LogError::Stopped)?;
        rx.recv().map_err(|_| LogError::Stopped)
    }

    /// Waits until every line recorded so far is in its file (blocking).
    ///
    /// # Errors
    /// [`LogError::Stopped`].
    pub fn flush(&self) -> Result<(), LogError> {
        self.ask(writer::Op::Barrier)
    }

    /// Waits until every line recorded so far is on the disk (`fsync`).
    ///
    /// # Errors
    /// [`LogError::Stopped`].
    pub async fn sync(&self) -> Result<(), LogError> {
        let logs = self.clone();
        tokio::task::spawn_blocking(move || logs.ask(writer::Op::Sync))
            .await
            .map_err(|_| LogError::Stopped)?
    }

    /// Every line numbered up to this one is on the disk.
    #[must_use]
    pub fn synced_seq(&self) -> u64 {
        self.inner.shared.synced_seq.load(Ordering::SeqCst)
    }

    /// How the store is doing.
    #[must_use]
    pub fn stats(&self) -> LogStats {
        let services = self.inner.services.lock();
        LogStats {
            last_seq: services.next_seq - 1,
            synced_seq: self.synced_seq(),
            queued: self.inner.shared.queued.load(Ordering::Relaxed),
            dropped: services.by_name.values().map(|s| s.dropped).sum(),
            failed: self.inner.shared.failed.load(Ordering::Relaxed),
        }
    }

    /// How many of `service`'s lines were dropped since the guest started.
    #[must_use]
    pub fn dropped(&self, service: &str) -> u64 {
        self.inner
            .services
            .lock()
            .by_name
            .get(service)
            .map_or(0, |s| s.dropped)
    }

    /// Reads `reader` into `service`'s log until it ends: in chunks of up
    /// to 64 KiB, each chunk's complete lines recorded together
    /// ([`Logs::record_lines`]); a line longer than 64 KiB is split, and a
    /// last line without its newline is kept.
    pub fn capture(
        &self,
        service: &str,
        stream: Stream,
        reader: impl AsyncRead + Unpin + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let (logs, service) = (self.clone(), service.to_owned());
        tokio::spawn(async move {
            let mut reader = reader;
            let mut buf: Vec<u8> = Vec::with_capacity(MAX_LINE);
            loop {
                if buf.len() == buf.capacity() {
                    buf.reserve(MAX_LINE);
                }
                let n = match reader.read_buf(&mut buf).await {
                    Ok(n) => n,
                    Err(err) => {
                        tracing::debug!(%err, service, "log capture ended");
                        0
                    }
                };
                if n == 0 {
                    if !buf.is_empty() {
                        logs.record_lines(&service, stream, [trim_line(&buf)]);
                    }
                    return;
                }
                let end = match buf.iter().rposition(|&b| b == b'\n') {
                    Some(i) => i + 1,
                    // No newline in a full line's worth: it is split here.
                    None if buf.len() >= MAX_LINE => buf.len(),
                    None => continue,
                };
                logs.record_lines(
                    &service,
                    stream,
                    buf[..end]
                        .split_inclusive(|&b| b == b'\n')
                        .flat_map(|l| l.chunks(MAX_LINE))
                        .map(trim_line),
                );
                buf.drain(..end);
            }
        })
    }

    /// `service`'s lines from the files (oldest first): only those from
    /// `since_ms` on, and of those the last `last`. Blocking (it waits for
    /// the writer to catch up, then reads files): call from
    /// `spawn_blocking`.
    ///
    /// # Errors
    /// [`LogError`] if a file cannot be read.
    pub fn query(
        &self,
        service: &str,
        last: Option<usize>,
        since_ms: Option<u64>,
    ) -> Result<Vec<LogLine>, LogError> {
        check_name(service)?;
        self.flush()?;
        let mut lines = Vec::new();
        for n in (0..=self.inner.limits.keep_files).rev() {
            let path = self.file(service, n);
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(LogError::Io { path, source }),
            };
            lines.extend(
                text.lines()
                    .filter_map(|l| serde_json::from_str::<LogLine>(l).ok())
                    .filter(|l| since_ms.is_none_or(|s| l.ts_ms >= s)),
            );
        }
        if let Some(n) = last {
            let skip = lines.len().saturating_sub(n);
            lines.drain(..skip);
        }
        Ok(lines)
    }

    /// New lines of `service` from now on.
    #[must_use]
    pub fn follow(&self, service: &str) -> broadcast::Receiver<LogLine> {
        let mut services = self.inner.services.lock();
        service_state(&mut services.by_name, service, &self.inner.limits)
            .live
            .subscribe()
    }

    /// The in-memory tail of `service`.
    #[must_use]
    pub fn tail(&self, service: &str) -> Vec<LogLine> {
        let services = self.inner.services.lock();
        services
            .by_name
            .get(service)
            .map(|s| s.tail.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Deletes `service`'s files (on the writer thread, after the lines
    /// queued before) and tail.
    pub async fn remove(&self, service: &str) {
        if check_name(service).is_err() {
            return;
        }
        self.inner.services.lock().by_name.remove(service);
        let (logs, service) = (self.clone(), service.to_owned());
        let removed = tokio::task::spawn_blocking(move || {
            logs.ask(|done| writer::Op::Remove { service, done })
        })
        .await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::warn!("a service's log files could not be removed: the writer has stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nestbox-logs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn captures_lines_with_a_final_partial_one() {
        let dir = temp("capture");
        let logs = Logs::open(&dir, LogLimits::default()).unwrap();
        let mut live = logs.follow("web");
        let input: &[u8] = b"one\r\ntwo\nthree";
        logs.capture("web", Stream::Stdout, input).await.unwrap();
        let got: Vec<String> = logs
            .query("web", None, None)
            .unwrap()
            .into_iter()
            .map(|l| l.line)
            .collect();
        assert_eq!(got, ["one", "two", "three"]);
        assert_eq!(live.recv().await.unwrap().line, "one");
        assert_eq!(logs.tail("web").len(), 3);
        // A new store (a restarted guest) reads the file.
        let again = Logs::open(&dir, LogLimits::default()).unwrap();
        assert_eq!(again.query("web", Some(1), None).unwrap()[0].line, "three");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn rotates_and_queries_across_files() {
        let dir = temp("rotate");
        let limits = LogLimits {
            max_file_bytes: 300,
            keep_files: 2,
            tail_lines: 5,
            ..LogLimits::default()
        };
        let logs = Logs::open(&dir, limits).unwrap();
        for i in 0..40 {
            logs.record("svc", Stream::Stderr, format!("line {i:02}"));
        }
        logs.flush().unwrap();
        assert!(dir.join("svc.log.2").exists());
        assert!(!dir.join("svc.log.3").exists());
        let all = logs.query("svc", None, None).unwrap();
        // The oldest were rotated away; what is left is in order and ends
        // with the newest.
        assert!(all.len() < 40 && all.len() > 5);
        assert_eq!(all.last().unwrap().line, "line 39");
        assert!(all.windows(2).all(|w| w[0].line < w[1].line));
        assert_eq!(logs.tail("svc").len(), 5);
        let last2 = logs.query("svc", Some(2), None).unwrap();
        assert_eq!(last2[0].line, "line 38");
        let future = logs.query("svc", None, Some(u64::MAX)).unwrap();
        assert!(future.is_empty());
        logs.remove("svc").await;
        assert!(logs.query("svc", None, None).unwrap().is_empty());
        assert!(matches!(
            logs.query("../x", None, None),
            Err(LogError::BadName(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn numbers_lines_across_restarts_and_syncs_on_a_cadence() {
        let dir = temp("sync");
        let limits = LogLimits {
            sync_interval_ms: 100,
            ..LogLimits::default()
        };
        let logs = Logs::open(&dir, limits).unwrap();
        for i in 0..10 {
            logs.record("a", Stream::Stdout, format!("{i}"));
        }
        logs.record("b", Stream::Stdout, "b");
        let stats = logs.stats();
        assert_eq!(stats.last_seq, 11);
        // Synced within the cadence, with nobody asking.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while logs.synced_seq() < 11 {
            assert!(Instant::now() < deadline, "not synced: {:?}", logs.stats());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let seqs: Vec<u64> = logs
            .query("a", None, None)
            .unwrap()
            .iter()
            .map(|l| l.seq)
            .collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        drop(logs);
        let again = Logs::open(&dir, limits).unwrap();
        again.record("a", Stream::Stdout, "after");
        again.sync().await.unwrap();
        assert_eq!(again.synced_seq(), 12, "numbers go on after a restart");
        assert_eq!(again.query("a", Some(1), None).unwrap()[0].seq, 12);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_flood_is_cut_to_the_rate_and_counted() {
        let dir = temp("flood");
        let limits = LogLimits {
            rate_lines_per_s: 100,
            burst_lines: 50,
            ..LogLimits::default()
        };
        let logs = Logs::open(&dir, limits).unwrap();
        for i in 0..1000 {
            logs.record("noisy", Stream::Stdout, format!("{i}"));
        }
        // System lines are never dropped.
        logs.record("noisy", Stream::System, "exited");
        let kept = logs.query("noisy", None, None).unwrap();
        let out = kept.iter().filter(|l| l.stream == Stream::Stdout).count();
        assert!((50..60).contains(&out), "the burst and little more: {out}");
        assert_eq!(logs.dropped("noisy"), 1000 - out as u64);
        assert_eq!(logs.stats().dropped, 1000 - out as u64);
        // The next line taken says how many went before it.
        let lines = logs.query("noisy", Some(2), None).unwrap();
        assert_eq!(
            lines[0].line,
            format!(
                "{} lines dropped: over 100 lines/s, or the disk fell behind",
                1000 - out
            )
        );
        assert_eq!(lines[1].line, "exited");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        logs.record("noisy", Stream::Stdout, "calm again");
        let lines = logs.query("noisy", Some(1), None).unwrap();
        assert_eq!(lines[0].line, "calm again", "nothing more to report");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
