//! Logs of user services: every line a service writes to stdout or stderr,
//! stamped and tagged, appended to its file on the data disk before the
//! next line is read (so nothing written before a crash is lost), rotated
//! by size, kept in a bounded in-memory tail, and sent to followers.
//!
//! Files: `<dir>/<service>.log` (NDJSON, one [`LogLine`] per line), rotated
//! to `<service>.log.1` … `.N`. Queries read the files, so they answer
//! after a restart of the guest too.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::broadcast;

/// Longest line kept whole; longer ones are split.
const MAX_LINE: usize = 64 * 1024;

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
}

/// Size limits.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogLimits {
    /// A service's current file is rotated past this size.
    pub max_file_bytes: u64,
    /// Rotated files kept per service.
    pub keep_files: usize,
    /// Lines kept in memory per service.
    pub tail_lines: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 8 * 1024 * 1024,
            keep_files: 3,
            tail_lines: 1000,
        }
    }
}

/// Which output a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// The service manager (started, exited, restarting).
    System,
}

/// One line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When it was read (Unix ms).
    pub ts_ms: u64,
    /// The service.
    pub service: String,
    /// Where it came from.
    pub stream: Stream,
    /// The text (lossy UTF-8, without the newline).
    pub line: String,
}

struct Service {
    file: Option<std::fs::File>,
    size: u64,
    tail: VecDeque<LogLine>,
    live: broadcast::Sender<LogLine>,
}

struct Inner {
    dir: PathBuf,
    limits: LogLimits,
    services: Mutex<HashMap<String, Service>>,
}

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
fn service_state<'a>(services: &'a mut HashMap<String, Service>, service: &str) -> &'a mut Service {
    services
        .entry(service.to_owned())
        .or_insert_with(|| Service {
            file: None,
            size: 0,
            tail: VecDeque::new(),
            live: broadcast::channel(256).0,
        })
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
        std::fs::create_dir_all(dir).map_err(|source| LogError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                limits,
                services: Mutex::default(),
            }),
        })
    }

    fn file(&self, service: &str, n: usize) -> PathBuf {
        let name = if n == 0 {
            format!("{service}.log")
        } else {
            format!("{service}.log.{n}")
        };
        self.inner.dir.join(name)
    }

    /// Records one line now: on disk, in the tail, to followers.
    pub fn record(&self, service: &str, stream: Stream, line: String) {
        if check_name(service).is_err() {
            return;
        }
        let entry = LogLine {
            ts_ms: now_ms(),
            service: service.to_owned(),
            stream,
            line,
        };
        let mut json = serde_json::to_vec(&entry).expect("a log line serializes");
        json.push(b'\n');
        let mut services = self.inner.services.lock().expect("logs lock");
        let svc = service_state(&mut services, service);
        if let Err(err) = self.append(service, svc, &json) {
            tracing::warn!(%err, service, "a log line could not be written");
        }
        if svc.tail.len() >= self.inner.limits.tail_lines.max(1) {
            svc.tail.pop_front();
        }
        svc.tail.push_back(entry.clone());
        let _ = svc.live.send(entry);
    }

    fn append(&self, service: &str, svc: &mut Service, json: &[u8]) -> Result<(), LogError> {
        let path = self.file(service, 0);
        let io = |source| LogError::Io {
            path: path.clone(),
            source,
        };
        if svc.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io)?;
            svc.size = file.metadata().map_err(io)?.len();
            svc.file = Some(file);
        }
        if svc.size > 0 && svc.size + json.len() as u64 > self.inner.limits.max_file_bytes {
            svc.file = None;
            let keep = self.inner.limits.keep_files;
            let _ = std::fs::remove_file(self.file(service, keep));
            for n in (0..keep).rev() {
                let _ = std::fs::rename(self.file(service, n), self.file(service, n + 1));
            }
            if keep == 0 {
                let _ = std::fs::remove_file(&path);
            }
            svc.file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(io)?,
            );
            svc.size = 0;
        }
        let file = svc.file.as_mut().expect("opened above");
        file.write_all(json).map_err(io)?;
        svc.size += json.len() as u64;
        Ok(())
    }

    /// Reads `reader` line by line into `service`'s log until it ends.
    pub fn capture(
        &self,
        service: &str,
        stream: Stream,
        reader: impl AsyncRead + Unpin + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let (logs, service) = (self.clone(), service.to_owned());
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = match (&mut reader)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut buf)
                    .await
                {
                    Ok(n) => n,
                    Err(err) => {
                        tracing::debug!(%err, service, "log capture ended");
                        return;
                    }
                };
                if n == 0 {
                    return;
                }
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                    if buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                }
                logs.record(&service, stream, String::from_utf8_lossy(&buf).into_owned());
            }
        })
    }

    /// `service`'s lines from the files (oldest first): only those from
    /// `since_ms` on, and of those the last `last`. Blocking file reads:
    /// call from `spawn_blocking`.
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
        let mut services = self.inner.services.lock().expect("logs lock");
        service_state(&mut services, service).live.subscribe()
    }

    /// The in-memory tail of `service`.
    #[must_use]
    pub fn tail(&self, service: &str) -> Vec<LogLine> {
        let services = self.inner.services.lock().expect("logs lock");
        services
            .get(service)
            .map(|s| s.tail.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Deletes `service`'s files and tail.
    pub fn remove(&self, service: &str) {
        if check_name(service).is_err() {
            return;
        }
        self.inner
            .services
            .lock()
            .expect("logs lock")
            .remove(service);
        for n in 0..=self.inner.limits.keep_files {
            let _ = std::fs::remove_file(self.file(service, n));
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

    #[test]
    fn rotates_and_queries_across_files() {
        let dir = temp("rotate");
        let limits = LogLimits {
            max_file_bytes: 300,
            keep_files: 2,
            tail_lines: 5,
        };
        let logs = Logs::open(&dir, limits).unwrap();
        for i in 0..40 {
            logs.record("svc", Stream::Stderr, format!("line {i:02}"));
        }
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
        logs.remove("svc");
        assert!(logs.query("svc", None, None).unwrap().is_empty());
        assert!(matches!(
            logs.query("../x", None, None),
            Err(LogError::BadName(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
