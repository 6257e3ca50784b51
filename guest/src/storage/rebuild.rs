//! A new VM's user disk built from an object store's checkpoint
//! (`[storage.from]`, which `nestbox-launcher create --from` sets): the
//! checkpoint's chain, its full stream first, each stream's chunks
//! downloaded in order (a few ahead, bounded), checked against their hash
//! and fed to `btrfs receive`; each received snapshot becomes a local
//! checkpoint, and the layer a writable snapshot of the last one.
//!
//! Crash safety: each stream is received into `checkpoints/<id>`, and
//! `btrfs receive` sets the subvolume's received UUID only once it is
//! whole (a received subvolume cannot be moved: its `..` is read-only);
//! a try finds what an earlier one left, keeps the subvolumes whose
//! received UUID is their manifest's, and deletes any other (a stream cut
//! short). The layer is made last, so a disk with a `layer` is done, and
//! a start that finds none goes on from the first stream it lacks. Until then the container stays
//! down (a failed rebuild is the user disk's error, in `GET /v1/status`).

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::path::Path;

use bytes::Bytes;
use nestbox_api::types::{Rebuild, RebuildState};
use tokio::io::AsyncWriteExt;

use super::btrfs;
use super::layer::LAYER;
use super::remote::{self, ChunkRef, From, Manifest, Remote, Settings};
use super::{Storage, blocking};

const SNAPSHOTS: &str = "checkpoints";
/// Tries before a rebuild is reported failed (pauses of 1, 2, 4, 8 s).
const TRIES: usize = 5;

/// What a rebuild gave: the chain received (the full stream first) and
/// the next user checkpoint number the prefix leaves free.
#[derive(Debug)]
pub struct Rebuilt {
    /// The checkpoints received and kept (those the source deleted are
    /// received for the streams after them, then deleted).
    pub chain: Vec<Manifest>,
    /// The prefix's highest `v<N>` plus one.
    pub next: u64,
}

/// Builds the user's disk at `user` from `from`, unless it has a layer
/// already (`None`: nothing was to do). Progress goes to `storage`.
///
/// # Errors
/// Why it stopped (the disk is left for the next try).
pub async fn rebuild(
    user: &Path,
    from: &From,
    settings: &Settings,
    storage: &Storage,
) -> Result<Option<Rebuilt>, String> {
    if user.join(LAYER).exists() {
        return Ok(None);
    }
    storage.start_rebuild(Rebuild {
        from: from.url.clone(),
        checkpoint: from.checkpoint.clone(),
        state: RebuildState::Running,
        streams: 0,
        bytes: 0,
        total_bytes: 0,
        error: None,
    });
    // A server not reachable yet (the network coming up, a restart) is
    // waited for a little; what the tries leave is picked up by the next.
    let mut pause = std::time::Duration::from_secs(1);
    let mut done = receive_chain(user, from, settings, storage).await;
    for _ in 0..TRIES - 1 {
        let Err(why) = &done else { break };
        tracing::warn!(%why, "the rebuild failed; tried again in {pause:?}");
        storage.update_rebuild(|r| r.error = Some(why.clone()));
        tokio::time::sleep(pause).await;
        pause *= 2;
        storage.update_rebuild(|r| r.bytes = 0);
        done = receive_chain(user, from, settings, storage).await;
    }
    match &done {
        Ok(_) => storage.update_rebuild(|r| {
            r.state = RebuildState::Done;
            r.error = None;
        }),
        Err(e) => storage.update_rebuild(|r| {
            r.state = RebuildState::Failed;
            r.error = Some(e.clone());
        }),
    }
    done.map(Some)
}

async fn receive_chain(
    user: &Path,
    from: &From,
    settings: &Settings,
    storage: &Storage,
) -> Result<Rebuilt, String> {
    let t0 = std::time::Instant::now();
    let remote = Remote::open(&from.url, settings)?;
    let chain = remote::chain(&remote, &from.checkpoint).await?;
    let next = remote
        .names("manifests")
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .filter_map(|n| {
            n.strip_suffix(".json")?
                .strip_prefix('v')?
                .parse::<u64>()
                .ok()
        })
        .max()
        .map_or(0, |n| n + 1);
    let total: u64 = chain.iter().map(|m| m.stream_bytes).sum();
    storage.update_rebuild(|r| {
        r.streams = chain.len();
        r.total_bytes = total;
    });
    let snapshots = user.join(SNAPSHOTS);
    {
        let snapshots = snapshots.clone();
        blocking(move || {
            std::fs::create_dir_all(&snapshots).map_err(|e| format!("{}: {e}", snapshots.display()))
        })
        .await?;
    }
    for m in &chain {
        let have = snapshots.join(&m.id);
        let had = {
            let have = have.clone();
            blocking(move || {
                Ok(btrfs::is_subvolume(&have)
                    .then(|| btrfs::identity(&have).ok())
                    .flatten())
            })
            .await?
        };
        if had.as_ref() == Some(&m.uuid) {
            storage.update_rebuild(|r| {
                r.bytes += m.stream_bytes;
            });
            continue;
        }
        if had.is_some() || have.exists() {
            tracing::warn!(id = %m.id, "a stream cut short by an earlier try is received again");
            let (dir, id) = (snapshots.clone(), m.id.clone());
            blocking(move || empty_one(&dir, &id)).await?;
        }
        receive(&remote, m, &snapshots, settings.parallel, storage).await?;
    }
    let last = chain.last().expect("a chain has its checkpoint").id.clone();
    // Checkpoints the source's user deleted were needed only to receive
    // the later streams: they are not kept (nor shown).
    let deleted: Vec<String> = remote
        .names("deleted")
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|id| *id != last && chain.iter().any(|m| &m.id == id))
        .collect();
    let user = user.to_owned();
    {
        let deleted = deleted.clone();
        blocking(move || {
            btrfs::snapshot(
                &user.join(SNAPSHOTS).join(&last),
                &user,
                OsStr::new(LAYER),
                false,
            )
            .and_then(|()| btrfs::sync(&user))
            .map_err(|e| e.to_string())?;
            for id in &deleted {
                btrfs::delete_subvolume(&user.join(SNAPSHOTS), OsStr::new(id))
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .await?;
    }
    let chain: Vec<Manifest> = chain
        .into_iter()
        .filter(|m| !deleted.contains(&m.id))
        .collect();
    tracing::info!(
        from = %from.url,
        checkpoint = %from.checkpoint,
        streams = chain.len(),
        bytes = total,
        ms = t0.elapsed().as_millis(),
        "the user's disk was rebuilt from the object store"
    );
    Ok(Rebuilt { chain, next })
}

/// Deletes `dir/name`, what a broken try left (a subvolume, or a plain
/// file or directory).
fn empty_one(dir: &Path, name: &str) -> Result<(), String> {
    let path = dir.join(name);
    if btrfs::is_subvolume(&path) {
        btrfs::delete_subvolume(dir, OsStr::new(name)).map_err(|e| e.to_string())
    } else if path.is_dir() {
        std::fs::remove_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))
    } else {
        std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A chunk, checked: its length and hash are the manifest's. Retried a
/// few times (a server restarting).
async fn fetch(remote: Remote, c: ChunkRef) -> Result<Bytes, String> {
    let mut pause = std::time::Duration::from_millis(500);
    let mut tries = 0;
    loop {
        tries += 1;
        match remote.chunk(&c.hash).await {
            Ok(data) => {
                let hash = remote::hash(&data);
                if data.len() != c.len as usize || hash != c.hash {
                    return Err(format!(
                        "chunk {} in {} is damaged ({} bytes, hash {hash}): not received",
                        c.hash,
                        remote.url(),
                        data.len()
                    ));
                }
                return Ok(data);
            }
            Err(e) if tries < 6 => {
                tracing::warn!(err = %e, chunk = %c.hash, "a chunk's download failed; retried");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Receives `m`'s stream into `dir`.
async fn receive(
    remote: &Remote,
    m: &Manifest,
    dir: &Path,
    parallel: usize,
    storage: &Storage,
) -> Result<(), String> {
    let mut child = tokio::process::Command::new("btrfs")
        .arg("receive")
        .arg(dir)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run btrfs receive (btrfs-progs): {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let mut whole = blake3::Hasher::new();
    let mut ahead: VecDeque<tokio::task::JoinHandle<Result<Bytes, String>>> = VecDeque::new();
    let mut todo = m.chunks.iter();
    let mut failure = None;
    loop {
        while ahead.len() < parallel.max(1) {
            let Some(c) = todo.next() else { break };
            ahead.push_back(tokio::spawn(fetch(remote.clone(), c.clone())));
        }
        let Some(next) = ahead.pop_front() else { break };
        let data = match next.await {
            Ok(Ok(data)) => data,
            Ok(Err(e)) => {
                failure = Some(e);
                break;
            }
            Err(e) => {
                failure = Some(format!("a chunk's download failed: {e}"));
                break;
            }
        };
        whole.update(&data);
        if let Err(e) = stdin.write_all(&data).await {
            failure = Some(format!("btrfs receive stopped reading: {e}"));
            break;
        }
        storage.update_rebuild(|r| {
            r.bytes += data.len() as u64;
        });
    }
    for h in ahead {
        h.abort();
    }
    drop(stdin);
    if failure.is_some() {
        let _ = child.kill().await;
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("btrfs receive: {e}"))?;
    let errors = errors.await.unwrap_or_default();
    if let Some(e) = failure {
        return Err(format!("{}: {e} {}", m.id, errors.trim()));
    }
    if !status.success() {
        return Err(format!(
            "btrfs receive of {} {status}: {}",
            m.id,
            errors.trim()
        ));
    }
    if whole.finalize().to_hex().as_str() != m.stream_blake3 {
        return Err(format!(
            "the stream of {} does not match its manifest's hash",
            m.id
        ));
    }
    Ok(())
}
