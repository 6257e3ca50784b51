//! Files of the inner container (`/v1/fs/…`), with Sprites' paths and JSON
//! shapes: `read`, `write`, `list`, `delete`, `rename`, `copy`, `chmod`;
//! and beyond them `archive` (a directory as a tar stream, both ways) and
//! `watch` (a WebSocket of inotify events). Paths are the container's:
//! relative ones are taken from `workingDir` (default `/`).

use serde::{Deserialize, Serialize};

/// One entry of a listing (or the one entry for a file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Its absolute path in the container.
    pub path: String,
    /// `file`, `directory`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its permission bits, octal (`0644`).
    pub mode: String,
    /// When it was last modified (RFC 3339).
    pub mod_time: String,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `GET /v1/fs/list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The path listed.
    pub path: String,
    /// Its entries, by name.
    pub entries: Vec<Entry>,
    /// How many.
    pub count: usize,
}

/// `PUT /v1/fs/write`: the file as it is on the disk (fsynced, renamed into
/// place) when this answer comes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// Its path.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Its permission bits, octal.
    pub mode: String,
    /// The SHA-256 of what was written, hex.
    pub sha256: String,
}

/// `DELETE /v1/fs/delete`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// What was removed.
    pub deleted: Vec<String>,
    /// How many.
    pub count: usize,
}

/// `POST /v1/fs/rename` and `copy`'s request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Move {
    /// From.
    pub source: String,
    /// To.
    pub dest: String,
    /// For relative paths.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `copy`: directories with what they hold.
    #[serde(default)]
    pub recursive: bool,
    /// Sprites' clients send these; nothing is done as another user here.
    #[serde(default)]
    pub preserve_attrs: bool,
    /// As `preserve_attrs`.
    #[serde(default)]
    pub as_root: bool,
}

/// `POST /v1/fs/rename`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renamed {
    /// From.
    pub source: String,
    /// To.
    pub dest: String,
}

/// One copied file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopiedFile {
    /// From.
    pub source: String,
    /// To.
    pub dest: String,
}

/// `POST /v1/fs/copy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Copied {
    /// What was copied.
    pub copied: Vec<CopiedFile>,
    /// How many.
    pub count: usize,
    /// Bytes copied.
    pub total_bytes: u64,
}

/// `POST /v1/fs/chmod`'s request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Chmod {
    /// The path.
    pub path: String,
    /// For a relative path.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// Octal permission bits (`0755`).
    pub mode: String,
    /// Everything below a directory too.
    #[serde(default)]
    pub recursive: bool,
    /// Sprites' clients send it; nothing is done as another user here.
    #[serde(default)]
    pub as_root: bool,
}

/// One changed path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affected {
    /// The path.
    pub path: String,
    /// Its new mode, octal.
    pub mode: String,
}

/// `POST /v1/fs/chmod`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chmodded {
    /// What changed.
    pub affected: Vec<Affected>,
    /// How many.
    pub count: usize,
}

/// `PUT /v1/fs/archive`: what a tar stream became.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extracted {
    /// The directory it went into.
    pub path: String,
    /// Files, directories and symlinks made.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Entries of other kinds (devices, hard links, …), skipped.
    pub skipped: u64,
}

/// One frame of `GET /v1/fs/watch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchEvent {
    /// Something changed.
    Event {
        /// `created`, `modified`, `deleted` or `renamed`.
        event: String,
        /// The path it happened to (for `renamed`: the new one).
        path: String,
        /// For `renamed`: the old path, when the watch saw both ends.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        /// Whether it is a directory.
        #[serde(rename = "isDir")]
        is_dir: bool,
        /// When the guest saw it (Unix ms).
        timestamp: u64,
    },
    /// The kernel's queue overflowed: events were lost; list again.
    Overflow {
        /// What to do.
        message: String,
    },
}
