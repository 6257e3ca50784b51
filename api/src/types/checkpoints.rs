//! Checkpoints of the user's filesystem (`/v1/checkpoints`): each a
//! read-only snapshot of the container's writable layer, restorable in
//! place. Creating and restoring answer with a stream of progress lines
//! (NDJSON, Sprites' shape: `info` lines, then `complete` or `error`).

use serde::{Deserialize, Serialize};

/// `POST /v1/checkpoints`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// A note of the user's, kept with the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// One checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// `v0`, `v1`, … in the order they were taken (an id is never reused);
    /// scheduled ones are `auto-0`, `auto-1`, ….
    pub id: String,
    /// When it was taken (ms since the Unix epoch).
    pub created_ms: u64,
    /// The user's note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The checkpoint the filesystem descended from when this one was taken
    /// (the last one taken or restored before it), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The guest image version it was taken on (its base root filesystem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The bytes of the files it holds over the base image (what the user
    /// wrote: the writable layer's regular files).
    pub size_bytes: u64,
    /// Where the container sees it read-only, while it is one of the
    /// most recent (`/.nestbox/checkpoints/<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounted_at: Option<String>,
    /// Its copy in the object store: waiting, uploading (with progress) or
    /// durable. Absent when the VM uploads nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<Upload>,
}

/// Where a checkpoint's upload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadState {
    /// Only on the VM's disk; its upload comes (after older ones).
    Local,
    /// Being uploaded now (or retried: `error` says why the last try
    /// failed).
    Uploading,
    /// In the object store, whole: a VM can be rebuilt from it.
    Durable,
}

/// A checkpoint's copy in the object store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// Where it is.
    pub state: UploadState,
    /// The checkpoint its stream is incremental to (none: a full stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Incremental links since the last full stream.
    #[serde(default)]
    pub depth: u32,
    /// The stream's bytes read so far (all of them once durable).
    pub stream_bytes: u64,
    /// Of those, the bytes of chunks written to the store (the others were
    /// there already, or written by an earlier try).
    pub sent_bytes: u64,
    /// The stream's chunks so far.
    pub chunks: u64,
    /// Chunks an earlier, interrupted try had already written, not sent
    /// again.
    #[serde(default)]
    pub resumed_chunks: u64,
    /// Tries so far.
    #[serde(default)]
    pub attempts: u32,
    /// Why the last try failed (it is retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it became durable (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable_ms: Option<u64>,
}

/// `GET /v1/checkpoints`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoints {
    /// Oldest first.
    pub checkpoints: Vec<Checkpoint>,
    /// The checkpoint the filesystem descends from now (the last taken or
    /// restored), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
}

/// The kind of a progress line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgressKind {
    /// A step done (`data` says which).
    Info,
    /// The operation ended well (`checkpoint` holds the result).
    Complete,
    /// It failed (`error` says why; nothing was changed).
    Error,
}

/// One line of a checkpoint's or a restore's progress stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// What the line reports.
    #[serde(rename = "type")]
    pub kind: ProgressKind,
    /// A step, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The error's code (as in the API's error bodies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// When (ms since the Unix epoch).
    pub time_ms: u64,
    /// The checkpoint made or restored, as soon as it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}
