//! Where checkpoints are kept off the VM: an object store (S3, or a local
//! directory by default) under this VM's prefix, written through
//! `object_store`. The layout under the prefix:
//!
//! - `chunks/<blake3>`: a piece of a `btrfs send` stream, cut where its
//!   content says (`fastcdc`), named by its hash and written once
//!   (`PutMode::Create`: `If-None-Match: *` on S3): a chunk another
//!   checkpoint already stored is not sent again, and an object is whole
//!   or absent, never half-written (an S3 PUT is atomic).
//! - `manifests/<id>.json`: a checkpoint's stream, written after every
//!   chunk it names: its base (the checkpoint the stream is incremental
//!   to, none for a full one), lineage, image version, the chunks with
//!   their sizes and the whole stream's hash. A manifest is what makes a
//!   checkpoint durable.
//! - `deleted/<id>`: a checkpoint the user deleted whose manifest is still
//!   the base of another's (see [`super::upload`]'s collection).
//!
//! The credentials live in the guest's configuration only: the container
//! sees neither it nor the platform's memory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

/// `[storage]` of the guest configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `s3://BUCKET/PREFIX` (this VM's own prefix), or `file:///DIR`.
    /// Default: `file://<user_dir>/objects`, a directory on the user's disk
    /// (the pipeline runs with nothing to set up; nothing leaves the VM).
    #[serde(default)]
    pub url: Option<String>,
    /// The S3 endpoint (`http://10.0.0.2:8333`); default: AWS's.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The S3 region.
    #[serde(default = "default_region")]
    pub region: String,
    /// The S3 access key's id.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Its secret.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Plain HTTP to the endpoint (a server on the LAN or in a test).
    #[serde(default)]
    pub allow_http: bool,
    /// A full stream (rather than an incremental one) after this many
    /// incremental links: a rebuild downloads at most this many plus one.
    #[serde(default = "default_full_every")]
    pub full_every: u32,
    /// Chunk uploads in flight at once (each holds at most one chunk,
    /// [`MAX_CHUNK`] bytes, in memory).
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// Upload checkpoints at all.
    #[serde(default = "default_true")]
    pub upload: bool,
    /// Build this VM's user disk from another prefix's checkpoint, once,
    /// on its first boot (`nestbox-launcher create --from`).
    #[serde(default)]
    pub from: Option<From>,
}

/// `[storage.from]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    /// The prefix to read, as `url` (`s3://BUCKET/PREFIX`); the same
    /// endpoint and credentials.
    pub url: String,
    /// The checkpoint (`v3`).
    pub checkpoint: String,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}
fn default_full_every() -> u32 {
    16
}
fn default_parallel() -> usize {
    4
}
fn default_true() -> bool {
    true
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            url: None,
            endpoint: None,
            region: default_region(),
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            full_every: default_full_every(),
            parallel: default_parallel(),
            upload: true,
            from: None,
        }
    }
}

/// The smallest chunk of a stream.
pub const MIN_CHUNK: u32 = 256 * 1024;
/// The chunks' average size.
pub const AVG_CHUNK: u32 = 1024 * 1024;
/// The largest chunk (what one upload in flight holds).
pub const MAX_CHUNK: u32 = 4 * 1024 * 1024;

/// A chunk's name: its blake3 hash, hex.
#[must_use]
pub fn hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// One chunk of a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Its blake3 hash, hex (its name under `chunks/`).
    pub hash: String,
    /// Its bytes.
    pub len: u32,
}

/// A checkpoint in the object store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The layout's version (1).
    pub format: u32,
    /// The checkpoint's id.
    pub id: String,
    /// The snapshot's btrfs UUID (its received UUID when it was itself
    /// received): who wrote this manifest.
    pub uuid: String,
    /// The checkpoint the stream is incremental to; none: a full stream.
    pub base: Option<String>,
    /// Incremental links since the last full stream (0 for a full one).
    pub depth: u32,
    /// The checkpoint the files descended from when it was taken.
    pub parent: Option<String>,
    /// The user's note.
    pub comment: Option<String>,
    /// The image version it was taken on.
    pub image: Option<String>,
    /// When it was taken (ms since the epoch).
    pub created_ms: u64,
    /// The layer's file bytes.
    pub size_bytes: u64,
    /// The stream's bytes.
    pub stream_bytes: u64,
    /// The whole stream's blake3, hex.
    pub stream_blake3: String,
    /// The stream, in order.
    pub chunks: Vec<ChunkRef>,
}

/// An object store call that failed.
#[derive(Debug, thiserror::Error)]
#[error("the object store ({url}): {source}")]
pub struct RemoteError {
    /// The store.
    pub url: String,
    /// Why.
    #[source]
    pub source: object_store::Error,
}

impl RemoteError {
    /// The store has no object of that name.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self.source, object_store::Error::NotFound { .. })
    }
}

/// A prefix of an object store.
#[derive(Clone, Debug)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    url: String,
}

/// What writing an object did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    /// It was written.
    Written,
    /// It was there already (left as it was).
    Existed,
}

impl Remote {
    /// The store at `url` (`s3://BUCKET/PREFIX` or `file:///DIR`) with
    /// `settings`' endpoint and credentials.
    ///
    /// # Errors
    /// A URL that is neither, or a store that cannot be built.
    pub fn open(url: &str, settings: &Settings) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("`{url}`: no bucket (s3://BUCKET/PREFIX)"));
            }
            let mut builder = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(&settings.region)
                .with_allow_http(settings.allow_http)
                .with_virtual_hosted_style_request(false)
                .with_retry(object_store::RetryConfig {
                    backoff: object_store::BackoffConfig::default(),
                    max_retries: 3,
                    retry_timeout: Duration::from_secs(20),
                })
                .with_client_options(
                    object_store::ClientOptions::new()
                        .with_connect_timeout(Duration::from_secs(5))
                        .with_timeout(Duration::from_mins(1))
                        .with_allow_http(settings.allow_http),
                );
            if let Some(endpoint) = &settings.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let (Some(id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key)
            {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
            } else {
                builder = builder.with_skip_signature(true);
            }
            let store = builder.build().map_err(|e| format!("`{url}`: {e}"))?;
            Ok(Self {
                store: Arc::new(store),
                prefix: Key::from(prefix.trim_matches('/')),
                url: url.to_owned(),
            })
        } else if let Some(dir) = url.strip_prefix("file://") {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).map_err(|e| format!("`{url}`: {e}"))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| format!("`{url}`: {e}"))?;
            Ok(Self {
                store: Arc::new(store),
                prefix: Key::default(),
                url: url.to_owned(),
            })
        } else {
            Err(format!(
                "`{url}`: an object store is `s3://BUCKET/PREFIX` or `file:///DIR`"
            ))
        }
    }

    /// The store's URL (no credentials in it).
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, parts: &[&str]) -> Key {
        let mut key = self.prefix.clone();
        for part in parts {
            key = key.join(*part);
        }
        key
    }

    fn err(&self, source: object_store::Error) -> RemoteError {
        RemoteError {
            url: self.url.clone(),
            source,
        }
    }

    /// A chunk's key.
    fn chunk_key(&self, hash: &str) -> Key {
        self.key(&["chunks", hash])
    }

    /// A manifest's key.
    fn manifest_key(&self, id: &str) -> Key {
        self.key(&["manifests", &format!("{id}.json")])
    }

    /// Writes `data` as chunk `hash` unless it is there.
    ///
    /// # Errors
    /// The store's.
    pub async fn put_chunk(&self, hash: &str, data: Bytes) -> Result<Put, RemoteError> {
        self.create(&self.chunk_key(hash), data).await
    }

    async fn create(&self, key: &Key, data: Bytes) -> Result<Put, RemoteError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(key, PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => Ok(Put::Written),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Put::Existed),
            Err(e) => Err(self.err(e)),
        }
    }

    /// A chunk's bytes.
    ///
    /// # Errors
    /// The store's (`NotFound` among them).
    pub async fn chunk(&self, hash: &str) -> Result<Bytes, RemoteError> {
        self.get(&self.chunk_key(hash)).await
    }

    async fn get(&self, key: &Key) -> Result<Bytes, RemoteError> {
        let got = self.store.get(key).await.map_err(|e| self.err(e))?;
        got.bytes().await.map_err(|e| self.err(e))
    }

    /// Writes a manifest unless one of that id is there; what is there is
    /// returned so the caller can tell its own from another's.
    ///
    /// # Errors
    /// The store's.
    pub async fn put_manifest(&self, m: &Manifest) -> Result<Option<Manifest>, RemoteError> {
        let bytes = Bytes::from(serde_json::to_vec_pretty(m).expect("a manifest serializes"));
        match self.create(&self.manifest_key(&m.id), bytes).await? {
            Put::Written => Ok(None),
            Put::Existed => self.manifest(&m.id).await,
        }
    }

    /// The manifest of `id`, if there is one.
    ///
    /// # Errors
    /// The store's, or a manifest that does not parse.
    pub async fn manifest(&self, id: &str) -> Result<Option<Manifest>, RemoteError> {
        match self.get(&self.manifest_key(id)).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                self.err(object_store::Error::Generic {
                    store: "manifest",
                    source: format!("manifests/{id}.json: {e}").into(),
                })
            }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The names of the objects under `dir` (`chunks`, `manifests`,
    /// `deleted`).
    ///
    /// # Errors
    /// The store's.
    pub async fn names(&self, dir: &str) -> Result<Vec<String>, RemoteError> {
        let prefix = self.key(&[dir]);
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.err(e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| m.location.filename().map(str::to_owned))
            .filter(|name| !name.starts_with('.'))
            .collect())
    }

    /// Every manifest, by id.
    ///
    /// # Errors
    /// The store's.
    pub async fn manifests(&self) -> Result<Vec<Manifest>, RemoteError> {
        let mut all = Vec::new();
        for name in self.names("manifests").await? {
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if let Some(m) = self.manifest(id).await? {
                all.push(m);
            }
        }
        Ok(all)
    }

    /// Marks `id` deleted (its manifest stays while another's stream needs
    /// it).
    ///
    /// # Errors
    /// The store's.
    pub async fn mark_deleted(&self, id: &str) -> Result<(), RemoteError> {
        self.create(&self.key(&["deleted", id]), Bytes::new())
            .await
            .map(drop)
    }

    /// Deletes one object: a chunk, a manifest (`<id>.json`) or a mark.
    ///
    /// # Errors
    /// The store's (a missing object is not one).
    pub async fn delete(&self, dir: &str, name: &str) -> Result<(), RemoteError> {
        match self.store.delete(&self.key(&[dir, name])).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }
}

/// The chain that rebuilds `id`: its manifest and its bases', the full
/// stream first.
///
/// # Errors
/// A missing manifest in the chain, a loop, or the store's.
pub async fn chain(remote: &Remote, id: &str) -> Result<Vec<Manifest>, String> {
    let mut chain = Vec::new();
    let mut next = Some(id.to_owned());
    while let Some(id) = next.take() {
        if chain.iter().any(|m: &Manifest| m.id == id) || chain.len() > 10_000 {
            return Err(format!("the chain of {id} in {} loops", remote.url()));
        }
        let m = remote
            .manifest(&id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "{} holds no checkpoint {id} (no manifests/{id}.json): it was never \
                     uploaded, or not yet",
                    remote.url()
                )
            })?;
        next.clone_from(&m.base);
        chain.push(m);
    }
    chain.reverse();
    Ok(chain)
}
