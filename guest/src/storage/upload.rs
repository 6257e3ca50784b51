//! The uploader: one task that makes checkpoints durable in the object
//! store ([`super::remote`]), oldest first, and deletes the copies of
//! deleted ones.
//!
//! A checkpoint's upload: `btrfs send [-p BASE] SNAPSHOT` (the base is its
//! parent when that is durable and here, see [`Store::next_upload`]), cut
//! into content-defined chunks as it is read, each chunk hashed (blake3)
//! and written under its hash unless there, at most `parallel` at once;
//! then its manifest. Memory stays bounded: the sender blocks while
//! `parallel` chunks are in flight and one more waits, each at most
//! [`super::remote::MAX_CHUNK`].
//!
//! Resuming: each chunk written is appended to a journal on the platform's
//! disk (`checkpoints/uploads/<id>.chunks`, synced per line); a try after a crash or a
//! failure reads the stream again and does not send the chunks the journal
//! names. Nothing is ever half-written in the store: a chunk or a manifest
//! is one atomic PUT, and a manifest comes after all of its chunks. A
//! failed try is retried with a growing pause (1 s to 60 s), for as long
//! as the checkpoint exists.
//!
//! Collection (after a deletion): a deleted checkpoint's copy gets a mark
//! (`deleted/<id>`); then every manifest that is marked and that no
//! unmarked manifest needs as a base (directly or down its chain) is
//! deleted with its mark, and every chunk that no remaining manifest and
//! no upload journal names is deleted. It runs in this same task, between
//! uploads, and this VM is the only writer of its prefix: no upload runs
//! while it looks, so no chunk an upload found "already there" can be
//! collected before that upload's manifest names it, and a resumed
//! upload's journal keeps its chunks.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nestbox_api::types::{Upload, UploadState};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::checkpoints::{Job, Live};
use super::remote::{self, ChunkRef, Manifest, Put, Remote};
use super::{Storage, Store, blocking};

/// The journals' directory, in the platform's `checkpoints` directory.
const JOURNALS: &str = "uploads";

/// A chunk read from the stream.
struct Piece {
    hash: String,
    data: Bytes,
}

/// How the stream ended.
struct Sent {
    bytes: u64,
    blake3: String,
}

fn journal_path(index_dir: &Path, id: &str) -> PathBuf {
    index_dir.join(JOURNALS).join(format!("{id}.chunks"))
}

/// The chunks a journal names.
fn journal(path: &Path) -> HashSet<String> {
    let Ok(file) = std::fs::File::open(path) else {
        return HashSet::new();
    };
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect()
}

/// Every journal's chunks (what collection must keep).
fn journals(index_dir: &Path) -> HashSet<String> {
    let Ok(dir) = std::fs::read_dir(index_dir.join(JOURNALS)) else {
        return HashSet::new();
    };
    dir.flatten().flat_map(|e| journal(&e.path())).collect()
}

/// Reads `btrfs send` of `job` (blocking) and hands its chunks to `tx`.
fn send_stream(job: &Job, tx: &mpsc::Sender<Piece>) -> Result<Sent, String> {
    let mut cmd = std::process::Command::new("btrfs");
    cmd.arg("send").arg("-q");
    if let Some((_, base, _)) = &job.base {
        cmd.arg("-p").arg(base);
    }
    cmd.arg(&job.snapshot)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run btrfs send (btrfs-progs): {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let mut whole = blake3::Hasher::new();
    let mut bytes = 0u64;
    let chunks = fastcdc::v2020::StreamCDC::new(
        stdout,
        remote::MIN_CHUNK as usize,
        remote::AVG_CHUNK as usize,
        remote::MAX_CHUNK as usize,
    );
    let mut stopped = None;
    for chunk in chunks {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                stopped = Some(format!("reading btrfs send: {e}"));
                break;
            }
        };
        whole.update(&chunk.data);
        bytes += chunk.data.len() as u64;
        let hash = remote::hash(&chunk.data);
        let piece = Piece {
            hash,
            data: Bytes::from(chunk.data),
        };
        if tx.blocking_send(piece).is_err() {
            stopped = Some("the upload stopped".to_owned());
            break;
        }
    }
    if stopped.is_some() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| format!("btrfs send: {e}"))?;
    let errors = errors.join().unwrap_or_default();
    if let Some(why) = stopped {
        return Err(why);
    }
    if !status.success() {
        return Err(format!("btrfs send {status}: {}", errors.trim()));
    }
    Ok(Sent {
        bytes,
        blake3: whole.finalize().to_hex().to_string(),
    })
}

/// The uploader's state for one try.
struct Try<'a> {
    remote: &'a Remote,
    live: &'a Live,
    id: String,
    now: Upload,
}

impl Try<'_> {
    fn show(&self) {
        self.live
            .progress
            .lock()
            .insert(self.id.clone(), self.now.clone());
    }
}

fn fresh(base: Option<&(String, PathBuf, u32)>, attempts: u32) -> Upload {
    Upload {
        state: UploadState::Uploading,
        base: base.map(|b| b.0.clone()),
        depth: base.map_or(0, |b| b.2),
        stream_bytes: 0,
        sent_bytes: 0,
        chunks: 0,
        resumed_chunks: 0,
        attempts,
        error: None,
        durable_ms: None,
    }
}

/// Removes `id`'s journal (its upload is done, or the checkpoint gone).
async fn forget_journal(index_dir: &Path, id: &str) {
    let path = journal_path(index_dir, id);
    let _ = blocking(move || {
        let _ = std::fs::remove_file(path);
        Ok(())
    })
    .await;
}

/// One try at `job`'s upload (its journal under `index_dir`); its
/// manifest once durable.
async fn upload(
    t: &mut Try<'_>,
    job: Job,
    index_dir: &Path,
    parallel: usize,
) -> Result<Manifest, String> {
    let snapshot = job.snapshot.clone();
    let uuid =
        blocking(move || super::btrfs::identity(&snapshot).map_err(|e| e.to_string())).await?;
    if let Some(there) = t
        .remote
        .manifest(&job.checkpoint.id)
        .await
        .map_err(|e| e.to_string())?
    {
        // An earlier try's (its record was not updated), or this very
        // snapshot's received from this prefix (a rebuild).
        return if there.uuid == uuid {
            Ok(there)
        } else {
            Err(conflict(t.remote, &job.checkpoint.id))
        };
    }
    let path = journal_path(index_dir, &job.checkpoint.id);
    let (done, log) = blocking(move || {
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        std::fs::create_dir_all(path.parent().expect("in a directory")).map_err(fail)?;
        let done = journal(&path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(fail)?;
        Ok((done, log))
    })
    .await?;
    let log = Arc::new(parking_lot::Mutex::new(log));
    let (chunks, sent) = send_chunks(t, &job, &done, &log, parallel).await?;
    let c = &job.checkpoint;
    let manifest = Manifest {
        format: 1,
        id: c.id.clone(),
        uuid,
        base: job.base.as_ref().map(|b| b.0.clone()),
        depth: job.base.as_ref().map_or(0, |b| b.2),
        parent: c.parent.clone(),
        comment: c.comment.clone(),
        image: c.image.clone(),
        created_ms: c.created_ms,
        size_bytes: c.size_bytes,
        stream_bytes: sent.bytes,
        stream_blake3: sent.blake3,
        chunks,
    };
    match t
        .remote
        .put_manifest(&manifest)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(there) if there.uuid != manifest.uuid => Err(conflict(t.remote, &c.id)),
        _ => Ok(manifest),
    }
}

/// Streams `job` through the chunker and uploads the chunks `done` does
/// not name, `parallel` at once; the stream's chunks and its end.
async fn send_chunks(
    t: &mut Try<'_>,
    job: &Job,
    done: &HashSet<String>,
    log: &Arc<parking_lot::Mutex<std::fs::File>>,
    parallel: usize,
) -> Result<(Vec<ChunkRef>, Sent), String> {
    let (tx, mut rx) = mpsc::channel::<Piece>(1);
    let sender = {
        let job = job.clone();
        tokio::task::spawn_blocking(move || send_stream(&job, &tx))
    };
    let mut chunks: Vec<ChunkRef> = Vec::new();
    let mut queued: HashSet<String> = HashSet::new();
    let mut flights: JoinSet<Flight> = JoinSet::new();
    let mut failure = None;
    while let Some(piece) = rx.recv().await {
        let len = piece.data.len();
        chunks.push(ChunkRef {
            hash: piece.hash.clone(),
            len: u32::try_from(len).expect("a chunk is at most MAX_CHUNK"),
        });
        t.now.stream_bytes += len as u64;
        t.now.chunks += 1;
        if done.contains(&piece.hash) {
            t.now.resumed_chunks += 1;
            t.show();
            continue;
        }
        if !queued.insert(piece.hash.clone()) {
            t.show();
            continue;
        }
        while flights.len() >= parallel.max(1) {
            if let Err(e) = landed(t, flights.join_next().await) {
                failure = Some(e);
                break;
            }
        }
        if failure.is_some() {
            break;
        }
        let (remote, log) = (t.remote.clone(), log.clone());
        flights.spawn(async move {
            let put = remote
                .put_chunk(&piece.hash, piece.data)
                .await
                .map_err(|e| e.to_string())?;
            // On the disk before it counts: a try after a crash skips
            // exactly what the store has. (A lost line costs one chunk sent
            // again, never a wrong skip.)
            let line = piece.hash.clone();
            blocking(move || {
                let mut log = log.lock();
                writeln!(log, "{line}")
                    .and_then(|()| log.sync_data())
                    .map_err(|e| format!("the upload's journal: {e}"))
            })
            .await?;
            Ok((piece.hash, len as u64, put))
        });
        t.show();
    }
    // Dropping the receiver stops the sender (it kills btrfs send).
    drop(rx);
    while failure.is_none() && !flights.is_empty() {
        if let Err(e) = landed(t, flights.join_next().await) {
            failure = Some(e);
        }
    }
    flights.abort_all();
    let sent = sender
        .await
        .map_err(|e| format!("the send task failed: {e}"))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let sent = sent?;
    Ok((chunks, sent))
}

fn conflict(remote: &Remote, id: &str) -> String {
    format!(
        "{} already holds a checkpoint {id} of another filesystem: this VM's prefix is \
         another's (give each VM its own prefix); nothing was overwritten",
        remote.url()
    )
}

/// What a chunk's upload gave: its hash, its bytes, what the store did.
type Flight = Result<(String, u64, Put), String>;

/// A chunk's upload (and its journal line) ended: count it.
fn landed(
    t: &mut Try<'_>,
    joined: Option<Result<Flight, tokio::task::JoinError>>,
) -> Result<(), String> {
    let Some(joined) = joined else { return Ok(()) };
    let (_, len, put) = joined.map_err(|e| format!("a chunk upload failed: {e}"))??;
    if put == Put::Written {
        t.now.sent_bytes += len;
    }
    t.show();
    Ok(())
}

/// Deletes the copies of deleted checkpoints, then collects.
async fn delete_copies(
    store: &Arc<Store>,
    remote: &Remote,
    index_dir: &Path,
) -> Result<(), String> {
    let pending = {
        let store = store.clone();
        blocking(move || Ok(store.remote_deletes())).await?
    };
    if pending.is_empty() {
        return Ok(());
    }
    for id in &pending {
        remote.mark_deleted(id).await.map_err(|e| e.to_string())?;
        forget_journal(index_dir, id).await;
    }
    collect(remote, index_dir).await?;
    for id in pending {
        let store = store.clone();
        blocking(move || store.remote_deleted(&id).map_err(|e| e.to_string())).await?;
    }
    Ok(())
}

/// What a collection removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Manifests deleted.
    pub manifests: usize,
    /// Chunks deleted.
    pub chunks: usize,
}

/// Deletes the manifests marked deleted that nothing needs, and the
/// chunks no manifest and no journal names (see the module's note).
///
/// # Errors
/// The store's.
pub async fn collect(remote: &Remote, index_dir: &Path) -> Result<Collected, String> {
    let manifests = remote.manifests().await.map_err(|e| e.to_string())?;
    let marked: HashSet<String> = remote
        .names("deleted")
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let mut needed: HashSet<&str> = HashSet::new();
    for m in manifests.iter().filter(|m| !marked.contains(&m.id)) {
        let mut at = Some(m);
        while let Some(m) = at {
            if !needed.insert(&m.id) {
                break;
            }
            at = m
                .base
                .as_ref()
                .and_then(|b| manifests.iter().find(|x| &x.id == b));
        }
    }
    let mut gone = Collected::default();
    for m in manifests.iter().filter(|m| !needed.contains(m.id.as_str())) {
        remote
            .delete("manifests", &format!("{}.json", m.id))
            .await
            .map_err(|e| e.to_string())?;
        gone.manifests += 1;
    }
    for id in marked.iter().filter(|id| !needed.contains(id.as_str())) {
        remote
            .delete("deleted", id)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut keep: HashSet<String> = {
        let index_dir = index_dir.to_owned();
        blocking(move || Ok(journals(&index_dir))).await?
    };
    for m in manifests.iter().filter(|m| needed.contains(m.id.as_str())) {
        keep.extend(m.chunks.iter().map(|c| c.hash.clone()));
    }
    for name in remote.names("chunks").await.map_err(|e| e.to_string())? {
        if !keep.contains(&name) {
            remote
                .delete("chunks", &name)
                .await
                .map_err(|e| e.to_string())?;
            gone.chunks += 1;
        }
    }
    Ok(gone)
}

/// Runs the uploader for the store in `storage` (once it is open) with
/// `remote`, until the guest stops.
pub fn spawn(storage: Storage, remote: Remote, settings: &remote::Settings) {
    let (full_every, parallel) = (settings.full_every, settings.parallel);
    tokio::spawn(async move {
        let Ok(store) = storage.shared_store() else {
            return;
        };
        let live = store.live();
        let mut pause = Duration::from_secs(1);
        let mut attempts = std::collections::HashMap::<String, u32>::default();
        let index_dir = {
            let store = store.clone();
            match blocking(move || Ok(store.index_dir())).await {
                Ok(dir) => dir,
                Err(err) => {
                    tracing::error!(%err, "checkpoints are not uploaded");
                    return;
                }
            }
        };
        tracing::info!(url = remote.url(), "checkpoints are uploaded");
        loop {
            if let Err(err) = delete_copies(&store, &remote, &index_dir).await {
                tracing::warn!(%err, "deleting checkpoints' copies failed; retried");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_mins(1));
                continue;
            }
            let job = {
                let store = store.clone();
                blocking(move || Ok(store.next_upload(full_every))).await
            };
            let Ok(Some(job)) = job else {
                // Nothing to do: wait to be woken (or look again in a while).
                let _ = tokio::time::timeout(Duration::from_mins(1), live.wake.notified()).await;
                continue;
            };
            let id = job.checkpoint.id.clone();
            let n = attempts.entry(id.clone()).or_default();
            *n += 1;
            let mut t = Try {
                remote: &remote,
                live: &live,
                id: id.clone(),
                now: fresh(job.base.as_ref(), *n),
            };
            t.show();
            let started = std::time::Instant::now();
            match upload(&mut t, job, &index_dir, parallel).await {
                Ok(m) => {
                    let upload = Upload {
                        state: UploadState::Durable,
                        base: m.base.clone(),
                        depth: m.depth,
                        stream_bytes: m.stream_bytes,
                        durable_ms: Some(crate::publish::now_ms()),
                        ..t.now.clone()
                    };
                    tracing::info!(
                        %id,
                        base = ?m.base,
                        stream_bytes = m.stream_bytes,
                        sent_bytes = upload.sent_bytes,
                        ms = started.elapsed().as_millis(),
                        "checkpoint durable"
                    );
                    let st = store.clone();
                    let done = id.clone();
                    if let Err(err) =
                        blocking(move || st.set_durable(&done, upload).map_err(|e| e.to_string()))
                            .await
                    {
                        tracing::warn!(%id, %err, "a durable checkpoint was not recorded");
                    }
                    forget_journal(&index_dir, &id).await;
                    attempts.remove(&id);
                    pause = Duration::from_secs(1);
                }
                Err(err) => {
                    tracing::warn!(%id, %err, "a checkpoint's upload failed; retried");
                    t.now.error = Some(err);
                    t.show();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_mins(1));
                }
            }
        }
    });
}
