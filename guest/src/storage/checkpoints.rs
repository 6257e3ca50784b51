//! Checkpoints of the user's filesystem: read-only btrfs snapshots of the
//! container's layer under `checkpoints/<id>` on the user's disk, their
//! records in an index on the platform's disk (so that a full user disk
//! never stops one being recorded or deleted), the most recent ones shown
//! read-only inside the container ([`super::views`]).
//!
//! Crash safety, step by step: a checkpoint is the snapshot first and the
//! record second; a snapshot found with no record (a crash between the
//! two, or a platform disk that was replaced) is adopted with what its
//! name and the disk tell, never deleted. A deletion removes the snapshot
//! first and the record second; a record with no snapshot is dropped.
//! Ids only grow: one is never given twice, even after a deletion.
//!
//! Checkpoints the user asks for are `v0`, `v1`, …; those taken on the
//! schedule of `[checkpoints] auto_interval_secs` are `auto-0`, `auto-1`,
//! … (a counter of their own), and only the last `auto_keep` of them are
//! kept: the user's own are never deleted but by the user.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nestbox_api::types::{Checkpoint, Checkpoints, Upload, UploadState};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::btrfs::{self, BtrfsError};
use super::layer::{self, LAYER, LayerError};
use super::views;

/// How many of the most recent checkpoints the container sees.
pub const VISIBLE: usize = 5;
/// Where the snapshots are, on the user's disk.
const SNAPSHOTS: &str = "checkpoints";
/// The index, in the platform's `checkpoints` directory.
const INDEX: &str = "index.json";

/// What a checkpoint operation ran into.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The user's disk is not (yet) there.
    #[error("{0}")]
    Unavailable(String),
    /// No such checkpoint.
    #[error("no checkpoint {0}: `GET /v1/checkpoints` lists them")]
    NotFound(String),
    /// The user's disk is full.
    #[error(
        "the user's disk is full ({0}); nothing was changed: free space in the container (or delete checkpoints) and try again"
    )]
    Full(String),
    /// The layer (a restore).
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A btrfs call.
    #[error(transparent)]
    Btrfs(BtrfsError),
    /// The index.
    #[error("the checkpoint index {}: {source}", path.display())]
    Index {
        /// Its file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl From<BtrfsError> for StoreError {
    fn from(e: BtrfsError) -> Self {
        if e.is_full() {
            Self::Full(e.to_string())
        } else {
            Self::Btrfs(e)
        }
    }
}

impl StoreError {
    /// The error's code on the wire.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::NotFound(_) => "not_found",
            Self::Full(_) => "insufficient_storage",
            _ => "internal",
        }
    }
}

/// `[checkpoints]` of the guest configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Seconds between scheduled (`auto-N`) checkpoints; 0: none.
    pub auto_interval_secs: u64,
    /// How many scheduled checkpoints are kept (the oldest go first).
    pub auto_keep: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            auto_interval_secs: 0,
            auto_keep: 3,
        }
    }
}

/// Who asked for a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The user (`v<N>`).
    User,
    /// The schedule (`auto-<N>`).
    Auto,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Self::User => "v",
            Self::Auto => "auto-",
        }
    }
}

/// The index's file: the records and what comes next.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    /// The number of the next user checkpoint's id.
    next: u64,
    /// The number of the next scheduled one's.
    #[serde(default)]
    next_auto: u64,
    /// What the layer descends from.
    #[serde(default)]
    head: Option<String>,
    /// Oldest first.
    #[serde(default)]
    checkpoints: Vec<Checkpoint>,
    /// Deleted checkpoints whose copy in the object store is still to be
    /// deleted (by the uploader, in order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    remote_deletes: Vec<String>,
}

/// Where things are.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The user's disk (btrfs), holding `layer` and `checkpoints`.
    pub user: PathBuf,
    /// The platform's directory for the index.
    pub index_dir: PathBuf,
    /// The base root filesystem (each view's lowest layer).
    pub base: PathBuf,
    /// The views' shared tmpfs, if the container is to see checkpoints.
    pub views: Option<PathBuf>,
    /// The image version recorded in each checkpoint.
    pub image: Option<String>,
    /// Whether checkpoints are uploaded to an object store
    /// ([`super::upload`]).
    pub uploads: bool,
}

#[derive(Debug)]
struct Inner {
    paths: Paths,
    index: Index,
    /// The ids whose views are mounted now.
    shown: Vec<String>,
}

/// The checkpoints of one user disk. Every method blocks (btrfs ioctls,
/// the index's fsync): call them off the runtime thread. They run one at
/// a time.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    live: Arc<Live>,
}

/// What the uploader shares with the store: the uploads in progress
/// (shown in every answer), and its wake-up call.
#[derive(Debug, Default)]
pub struct Live {
    /// Progress of the checkpoints being uploaded, by id.
    pub progress: Mutex<HashMap<String, Upload>>,
    /// Rung when there is something new to upload or delete.
    pub wake: tokio::sync::Notify,
}

/// A checkpoint to upload: what the uploader needs of it.
#[derive(Clone, Debug)]
pub struct Job {
    /// Its record.
    pub checkpoint: Checkpoint,
    /// Its snapshot.
    pub snapshot: PathBuf,
    /// The checkpoint to send it incrementally to, with its snapshot and
    /// its depth; none: a full stream.
    pub base: Option<(String, PathBuf, u32)>,
}

/// The kind and number of a checkpoint's id (`v3`, `auto-12`).
fn parse_id(id: &str) -> Option<(Kind, u64)> {
    let (kind, digits) = if let Some(d) = id.strip_prefix(Kind::Auto.prefix()) {
        (Kind::Auto, d)
    } else {
        (Kind::User, id.strip_prefix(Kind::User.prefix())?)
    };
    if digits.is_empty()
        || (digits.len() > 1 && digits.starts_with('0'))
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((kind, digits.parse().ok()?))
}

/// The bytes of the regular files under `dir` (one filesystem).
fn size_of(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() != top.dev() {
                continue;
            }
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

/// When the snapshot at `path` was taken (0 if btrfs cannot say).
fn created_ms(path: &Path) -> u64 {
    btrfs::created(path)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Inner {
    fn snapshots(&self) -> PathBuf {
        self.paths.user.join(SNAPSHOTS)
    }

    fn save(&self) -> Result<(), StoreError> {
        let path = self.paths.index_dir.join(INDEX);
        let text = serde_json::to_vec_pretty(&self.index).expect("the index serializes");
        nestbox_durable::write_atomic(&path, &text, 0o600).map_err(|e| StoreError::Index {
            path,
            source: std::io::Error::other(e.to_string()),
        })
    }

    fn find(&self, id: &str) -> Result<usize, StoreError> {
        self.index
            .checkpoints
            .iter()
            .position(|c| c.id == id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    fn with_mount(&self, live: &Live, mut c: Checkpoint) -> Checkpoint {
        c.mounted_at = self
            .shown
            .contains(&c.id)
            .then(|| format!("{}/{}", views::IN_CONTAINER, c.id));
        if let Some(now) = live.progress.lock().get(&c.id) {
            c.upload = Some(now.clone());
        } else if self.paths.uploads && c.upload.is_none() {
            c.upload = Some(Upload {
                state: UploadState::Local,
                base: None,
                depth: 0,
                stream_bytes: 0,
                sent_bytes: 0,
                chunks: 0,
                resumed_chunks: 0,
                attempts: 0,
                error: None,
                durable_ms: None,
            });
        }
        c
    }

    /// Mounts the views of the [`VISIBLE`] most recent checkpoints and
    /// unmounts the others'. A view that fails is logged: the checkpoint
    /// itself is whole.
    fn refresh_views(&mut self) {
        let Some(dir) = self.paths.views.clone() else {
            return;
        };
        let start = self.index.checkpoints.len().saturating_sub(VISIBLE);
        let wanted: Vec<String> = self.index.checkpoints[start..]
            .iter()
            .map(|c| c.id.clone())
            .collect();
        for id in std::mem::take(&mut self.shown) {
            if wanted.contains(&id) {
                self.shown.push(id);
            } else {
                views::hide(&dir, &id);
            }
        }
        for id in wanted {
            if self.shown.contains(&id) {
                continue;
            }
            let layer = self.snapshots().join(&id);
            match views::show(&dir, &id, &layer, &self.paths.base) {
                Ok(()) => self.shown.push(id),
                Err(err) => tracing::warn!(%err, "a checkpoint is not shown in the container"),
            }
        }
    }
}

impl Store {
    /// Opens the checkpoints of the btrfs disk at `paths.user`: reads the
    /// index, adopts snapshots it does not list, drops records whose
    /// snapshot is gone, and shows the recent ones.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn open(paths: Paths) -> Result<Self, StoreError> {
        if !btrfs::is_btrfs(&paths.user) {
            return Err(StoreError::Unavailable(format!(
                "checkpoints need the user's disk on btrfs, and {} is not: a VM created by this \
                 version's launcher has one",
                paths.user.display()
            )));
        }
        let index_path = paths.index_dir.join(INDEX);
        std::fs::create_dir_all(&paths.index_dir).map_err(|source| StoreError::Index {
            path: paths.index_dir.clone(),
            source,
        })?;
        let mut index: Index = match std::fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Index {
                path: index_path.clone(),
                source: std::io::Error::other(e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index::default(),
            Err(source) => {
                return Err(StoreError::Index {
                    path: index_path,
                    source,
                });
            }
        };
        let snapshots = paths.user.join(SNAPSHOTS);
        std::fs::create_dir_all(&snapshots).map_err(|source| StoreError::Index {
            path: snapshots.clone(),
            source,
        })?;
        let before = index.checkpoints.len();
        index
            .checkpoints
            .retain(|c| btrfs::is_subvolume(&snapshots.join(&c.id)));
        if index.checkpoints.len() != before {
            tracing::warn!(
                dropped = before - index.checkpoints.len(),
                "checkpoint records whose snapshot is gone were dropped"
            );
        }
        let found: Vec<((Kind, u64), String)> = std::fs::read_dir(&snapshots)
            .map_err(|source| StoreError::Index {
                path: snapshots.clone(),
                source,
            })?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| parse_id(&name).map(|n| (n, name)))
            .filter(|(_, name)| btrfs::is_subvolume(&snapshots.join(name)))
            .collect();
        for ((kind, n), id) in found {
            match kind {
                Kind::User => index.next = index.next.max(n + 1),
                Kind::Auto => index.next_auto = index.next_auto.max(n + 1),
            }
            if index.checkpoints.iter().any(|c| c.id == id) {
                continue;
            }
            tracing::warn!(%id, "a checkpoint with no record was adopted");
            let dir = snapshots.join(&id);
            index.checkpoints.push(Checkpoint {
                id,
                created_ms: created_ms(&dir),
                comment: Some("recovered: its record was lost".to_owned()),
                parent: None,
                image: None,
                size_bytes: size_of(&dir.join("upper")),
                mounted_at: None,
                upload: None,
            });
        }
        index
            .checkpoints
            .sort_by_key(|c| (c.created_ms, parse_id(&c.id).map(|(_, n)| n)));
        if let Some(dir) = &paths.views
            && let Err(err) = views::set_up(dir)
        {
            tracing::warn!(%err, "checkpoints will not be shown in the container");
        }
        let mut inner = Inner {
            paths,
            index,
            shown: Vec::new(),
        };
        inner.save()?;
        inner.refresh_views();
        Ok(Self {
            inner: Mutex::new(inner),
            live: Arc::default(),
        })
    }

    /// The platform's directory of the index (and the upload journals).
    #[must_use]
    pub fn index_dir(&self) -> PathBuf {
        self.inner.lock().paths.index_dir.clone()
    }

    /// What the uploader shares with the store.
    #[must_use]
    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
    }

    /// Every checkpoint, oldest first.
    #[must_use]
    pub fn list(&self) -> Checkpoints {
        let inner = self.inner.lock();
        Checkpoints {
            checkpoints: inner
                .index
                .checkpoints
                .iter()
                .map(|c| inner.with_mount(&self.live, c.clone()))
                .collect(),
            head: inner.index.head.clone(),
        }
    }

    /// One checkpoint.
    ///
    /// # Errors
    /// [`StoreError::NotFound`].
    pub fn get(&self, id: &str) -> Result<Checkpoint, StoreError> {
        let inner = self.inner.lock();
        let at = inner.find(id)?;
        Ok(inner.with_mount(&self.live, inner.index.checkpoints[at].clone()))
    }

    /// Takes a checkpoint of the layer: `taken` hears its id as soon as the
    /// snapshot exists; it returns once the record is on the platform's
    /// disk.
    ///
    /// # Errors
    /// [`StoreError::Full`] when the user's disk has no room for it (no
    /// checkpoint is left behind), others as they come.
    pub fn create(
        &self,
        comment: Option<String>,
        taken: impl FnOnce(&str),
    ) -> Result<Checkpoint, StoreError> {
        self.take(Kind::User, comment, taken)
    }

    /// A scheduled checkpoint (`auto-N`); then only the `keep` most recent
    /// scheduled ones are kept.
    ///
    /// # Errors
    /// As [`Store::create`]; a failed deletion of an old one is logged.
    pub fn create_auto(&self, keep: usize) -> Result<Checkpoint, StoreError> {
        let made = self.take(Kind::Auto, None, |_| {})?;
        let autos: Vec<String> = self
            .inner
            .lock()
            .index
            .checkpoints
            .iter()
            .filter(|c| parse_id(&c.id).is_some_and(|(k, _)| k == Kind::Auto))
            .map(|c| c.id.clone())
            .collect();
        for id in &autos[..autos.len().saturating_sub(keep.max(1))] {
            if let Err(err) = self.delete(id) {
                tracing::warn!(%id, %err, "an old scheduled checkpoint was not deleted");
            }
        }
        Ok(made)
    }

    fn take(
        &self,
        kind: Kind,
        comment: Option<String>,
        taken: impl FnOnce(&str),
    ) -> Result<Checkpoint, StoreError> {
        let mut inner = self.inner.lock();
        let n = match kind {
            Kind::User => inner.index.next,
            Kind::Auto => inner.index.next_auto,
        };
        let id = format!("{}{n}", kind.prefix());
        let snapshots = inner.snapshots();
        let created_ms = crate::publish::now_ms();
        btrfs::snapshot(
            &inner.paths.user.join(LAYER),
            &snapshots,
            OsStr::new(&id),
            true,
        )?;
        super::point("storage.snapshotted", &id);
        taken(&id);
        let checkpoint = Checkpoint {
            id: id.clone(),
            created_ms,
            comment,
            parent: inner.index.head.clone(),
            image: inner.paths.image.clone(),
            size_bytes: size_of(&snapshots.join(&id).join("upper")),
            mounted_at: None,
            upload: None,
        };
        match kind {
            Kind::User => inner.index.next += 1,
            Kind::Auto => inner.index.next_auto += 1,
        }
        inner.index.head = Some(id.clone());
        inner.index.checkpoints.push(checkpoint.clone());
        inner.save()?;
        inner.refresh_views();
        self.live.wake.notify_one();
        Ok(inner.with_mount(&self.live, checkpoint))
    }

    /// Deletes a checkpoint: its view, its snapshot, then its record.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], or the btrfs call's.
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        let at = inner.find(id)?;
        if let Some(dir) = inner.paths.views.clone() {
            views::hide(&dir, id);
            inner.shown.retain(|s| s != id);
        }
        btrfs::delete_subvolume(&inner.snapshots(), OsStr::new(id))?;
        let gone = inner.index.checkpoints.remove(at);
        // What descended from it descends from its parent now.
        if inner.index.head.as_deref() == Some(id) {
            inner.index.head.clone_from(&gone.parent);
        }
        for c in &mut inner.index.checkpoints {
            if c.parent.as_deref() == Some(id) {
                c.parent.clone_from(&gone.parent);
            }
        }
        if inner.paths.uploads {
            inner.index.remote_deletes.push(id.to_owned());
        }
        inner.save()?;
        inner.refresh_views();
        self.live.progress.lock().remove(id);
        self.live.wake.notify_one();
        Ok(())
    }

    /// Puts the layer back as it was at checkpoint `id`. The container
    /// must be down (the caller stops it and starts it again).
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; a full disk or a failed step leaves the
    /// layer as it was.
    pub fn restore(&self, id: &str) -> Result<Checkpoint, StoreError> {
        let mut inner = self.inner.lock();
        let at = inner.find(id)?;
        layer::restore(&inner.paths.user, &inner.snapshots().join(id)).map_err(|e| match e {
            LayerError::Btrfs(e) => StoreError::from(e),
            other @ LayerError::Io { .. } => StoreError::Layer(other),
        })?;
        inner.index.head = Some(id.to_owned());
        inner.save()?;
        Ok(inner.with_mount(&self.live, inner.index.checkpoints[at].clone()))
    }
}

/// The uploader's side of the store.
impl Store {
    /// The oldest checkpoint not yet durable, with the base its stream is
    /// to be incremental to: its parent, when the parent's snapshot is
    /// still here, the parent is durable and fewer than `full_every` links
    /// lead to the parent's full stream; otherwise a full stream.
    #[must_use]
    pub fn next_upload(&self, full_every: u32) -> Option<Job> {
        let inner = self.inner.lock();
        let durable = |c: &Checkpoint| {
            c.upload
                .as_ref()
                .is_some_and(|u| u.state == UploadState::Durable)
        };
        let c = inner.index.checkpoints.iter().find(|c| !durable(c))?;
        let base = c.parent.as_ref().and_then(|parent| {
            let p = inner.index.checkpoints.iter().find(|p| &p.id == parent)?;
            let depth = p.upload.as_ref().filter(|_| durable(p))?.depth;
            let snapshot = inner.snapshots().join(parent);
            (depth < full_every && btrfs::is_subvolume(&snapshot))
                .then(|| (parent.clone(), snapshot, depth + 1))
        });
        Some(Job {
            checkpoint: c.clone(),
            snapshot: inner.snapshots().join(&c.id),
            base,
        })
    }

    /// Records checkpoint `id` as durable (a deleted one is ignored).
    ///
    /// # Errors
    /// The index's.
    pub fn set_durable(&self, id: &str, upload: Upload) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        let Ok(at) = inner.find(id) else {
            return Ok(());
        };
        inner.index.checkpoints[at].upload = Some(upload);
        inner.save()?;
        self.live.progress.lock().remove(id);
        Ok(())
    }

    /// The deleted checkpoints whose copies are still to be deleted, oldest
    /// first.
    #[must_use]
    pub fn remote_deletes(&self) -> Vec<String> {
        self.inner.lock().index.remote_deletes.clone()
    }

    /// `id`'s copy is deleted.
    ///
    /// # Errors
    /// The index's.
    pub fn remote_deleted(&self, id: &str) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        inner.index.remote_deletes.retain(|d| d != id);
        inner.save()
    }

    /// After a rebuild from the object store: each checkpoint of `chain`
    /// (received into its snapshot) gets its manifest's record, the last
    /// one is the head, and ids go on after `next` at least (the prefix's
    /// highest, so an id of the prefix is never given again).
    ///
    /// # Errors
    /// The index's.
    pub fn import(&self, chain: &[super::remote::Manifest], next: u64) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        for m in chain {
            let Ok(at) = inner.find(&m.id) else { continue };
            let c = &mut inner.index.checkpoints[at];
            c.created_ms = m.created_ms;
            c.comment.clone_from(&m.comment);
            c.parent.clone_from(&m.parent);
            c.image.clone_from(&m.image);
            c.size_bytes = m.size_bytes;
        }
        inner
            .index
            .checkpoints
            .sort_by_key(|c| (c.created_ms, parse_id(&c.id).map(|(_, n)| n)));
        inner.index.head = chain.last().map(|m| m.id.clone());
        inner.index.next = inner.index.next.max(next);
        inner.save()?;
        inner.refresh_views();
        self.live.wake.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Kind, parse_id};

    #[test]
    fn ids_are_a_kind_and_a_plain_number() {
        assert_eq!(parse_id("v0"), Some((Kind::User, 0)));
        assert_eq!(parse_id("v12"), Some((Kind::User, 12)));
        assert_eq!(parse_id("auto-7"), Some((Kind::Auto, 7)));
        for bad in [
            "v", "v01", "x1", "v1a", "v-1", "v+1", "../v1", "", "auto-", "auto-01", "auto-x",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }
}
