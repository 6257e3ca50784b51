//! The log writer: one thread that owns every service's log file. It
//! appends the lines the runtime hands it, rotates files by size, and
//! `fsync`s what it wrote on a cadence (every `sync_interval`) and when
//! asked (a stop). File work never runs on the runtime thread, which also
//! serves HTTPS and the API: a slow or full disk delays logs, not requests.
//!
//! The queue to the thread is a channel that never blocks the sender; its
//! length is bounded by the senders ([`super::Logs::record`] drops and
//! counts a line when `queue_lines` are waiting).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::LogLimits;

/// Work for the writer.
pub(super) enum Op {
    /// Append `json` (one NDJSON line) to `service`'s file.
    Line {
        service: Arc<str>,
        json: Vec<u8>,
        seq: u64,
    },
    /// Remove `service`'s files; answered when done.
    Remove { service: String, done: Sender<()> },
    /// Answered once everything queued before is written (not synced).
    Barrier(Sender<()>),
    /// Answered once everything queued before is on the disk.
    Sync(Sender<()>),
}

/// What the writer shares with the store.
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// Every line with a sequence number up to this one is on the disk.
    pub synced_seq: AtomicU64,
    /// Lines queued and not yet written.
    pub queued: AtomicUsize,
    /// Lines that could not be written (a disk error).
    pub failed: AtomicU64,
}

/// The file of `service` in `dir`, rotation `n` (0: the current file).
pub(super) fn file(dir: &Path, service: &str, n: usize) -> PathBuf {
    if n == 0 {
        dir.join(format!("{service}.log"))
    } else {
        dir.join(format!("{service}.log.{n}"))
    }
}

struct Open {
    file: File,
    size: u64,
}

struct Writer {
    dir: PathBuf,
    limits: LogLimits,
    shared: Arc<Shared>,
    files: HashMap<Arc<str>, Open>,
    /// Files written since the last sync.
    dirty: HashSet<Arc<str>>,
    /// A name was created, renamed or removed in the directory since the
    /// last sync.
    dir_dirty: bool,
    /// The newest line written.
    written_seq: u64,
}

/// Starts the writer thread; it ends (after a last sync) when every
/// sender is gone.
pub(super) fn start(
    dir: PathBuf,
    limits: LogLimits,
    shared: Arc<Shared>,
    first_seq: u64,
) -> std::io::Result<Sender<Op>> {
    let (tx, rx) = std::sync::mpsc::channel();
    shared
        .synced_seq
        .store(first_seq.saturating_sub(1), Ordering::SeqCst);
    let mut writer = Writer {
        dir,
        limits,
        shared,
        files: HashMap::new(),
        dirty: HashSet::new(),
        dir_dirty: false,
        written_seq: first_seq.saturating_sub(1),
    };
    std::thread::Builder::new()
        .name("nestbox-logs".into())
        .spawn(move || writer.run(&rx))?;
    Ok(tx)
}

impl Writer {
    fn run(&mut self, rx: &Receiver<Op>) {
        let every = Duration::from_millis(self.limits.sync_interval_ms.max(1));
        let mut next_sync = Instant::now() + every;
        loop {
            let wait = next_sync.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(op) => self.handle(op),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.sync();
                    return;
                }
            }
            if Instant::now() >= next_sync {
                self.sync();
                next_sync = Instant::now() + every;
            }
        }
    }

    fn handle(&mut self, op: Op) {
        match op {
            Op::Line { service, json, seq } => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                if let Err(err) = self.append(&service, &json) {
                    self.shared.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%err, service = %service, "a log line could not be written");
                }
                self.written_seq = seq;
            }
            Op::Remove { service, done } => {
                self.files.remove(service.as_str());
                self.dirty.remove(service.as_str());
                for n in 0..=self.limits.keep_files {
                    let _ = std::fs::remove_file(file(&self.dir, &service, n));
                }
                self.dir_dirty = true;
                let _ = done.send(());
            }
            Op::Barrier(done) => {
                let _ = done.send(());
            }
            Op::Sync(done) => {
                self.sync();
                let _ = done.send(());
            }
        }
    }

    fn append(&mut self, service: &Arc<str>, json: &[u8]) -> std::io::Result<()> {
        let path = file(&self.dir, service, 0);
        if !self.files.contains_key(service) {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            let size = file.metadata()?.len();
            if size == 0 {
                self.dir_dirty = true;
            }
            self.files.insert(service.clone(), Open { file, size });
        }
        let open = self.files.get_mut(service).expect("opened above");
        if open.size > 0 && open.size + json.len() as u64 > self.limits.max_file_bytes {
            // What the full file holds goes to the disk before its name
            // moves, so a crash never loses a rotated line.
            open.file.sync_data()?;
            self.files.remove(service);
            let keep = self.limits.keep_files;
            let _ = std::fs::remove_file(file(&self.dir, service, keep));
            for n in (0..keep).rev() {
                let _ =
                    std::fs::rename(file(&self.dir, service, n), file(&self.dir, service, n + 1));
            }
            if keep == 0 {
                let _ = std::fs::remove_file(&path);
            }
            self.dir_dirty = true;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            self.files.insert(service.clone(), Open { file, size: 0 });
        }
        let open = self.files.get_mut(service).expect("opened above");
        open.file.write_all(json)?;
        open.size += json.len() as u64;
        self.dirty.insert(service.clone());
        Ok(())
    }

    /// `fsync`s every file written since the last sync (and the directory
    /// if names changed), then publishes how far lines are durable.
    fn sync(&mut self) {
        // Lines written, not yet on the disk (the subject is built only in
        // the tests' builds).
        #[cfg(feature = "faults")]
        if !self.dirty.is_empty() {
            let services: Vec<&str> = self.dirty.iter().map(|s| &**s).collect();
            crate::faults::point("logs.sync", &services.join(" "));
        }
        let mut ok = true;
        for service in std::mem::take(&mut self.dirty) {
            if let Some(open) = self.files.get(&service)
                && let Err(err) = open.file.sync_data()
            {
                ok = false;
                tracing::warn!(%err, service = %service, "a log file could not be synced");
            }
        }
        if std::mem::take(&mut self.dir_dirty)
            && let Err(err) = nestbox_durable::sync_dir(&self.dir)
        {
            ok = false;
            tracing::warn!(%err, "the log directory could not be synced");
        }
        if ok {
            self.shared
                .synced_seq
                .fetch_max(self.written_seq, Ordering::SeqCst);
        }
    }
}
