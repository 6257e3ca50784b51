//! `/v1/fs/…`: the inner container's files (see [`crate::files`]), with
//! Sprites' paths and shapes, streamed both ways: `read` (with `Range` and
//! `ETag`), `write` (temporary file, fsync, rename; 507 when the disk is
//! full), `list`, `delete`, `rename`, `copy`, `chmod`, `archive` (tar out
//! and in, gzip with `gzip=true`) and `watch` (a WebSocket of events).
#![deny(clippy::disallowed_methods)]

use axum::extract::FromRequest;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::SinkExt;
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use nestbox_api::fs::{Chmod, Chmodded, Copied, Deleted, Listing, Move, Renamed, Written};
use tokio::sync::mpsc;

use super::body;
use super::{ApiError, Parts};
use crate::files::resolve::absolute;
use crate::files::{Batch, FsError, IN_FLIGHT, archive, as_container, container_root, ops, watch};

fn error(err: &FsError) -> ApiError {
    let message = err.to_string();
    match err.errno() {
        Some(libc::ENOENT) => ApiError::not_found(message),
        Some(libc::EEXIST) => ApiError::new(StatusCode::CONFLICT, "exists", message),
        Some(libc::ENOTEMPTY) => ApiError::new(
            StatusCode::CONFLICT,
            "not_empty",
            format!("{message} (delete it with recursive=true)"),
        ),
        Some(libc::EACCES | libc::EPERM) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{message} (files are reached as the container's root)"),
        ),
        Some(libc::EROFS) => ApiError::new(StatusCode::FORBIDDEN, "read_only", message),
        Some(libc::ENOSPC | libc::EDQUOT) => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            format!("{message}: the user's disk is full (nothing was left half-written)"),
        ),
        Some(libc::ELOOP) => ApiError::invalid(format!(
            "{message} (magic links such as /proc/*/root are not followed)"
        )),
        Some(libc::ENOTDIR | libc::EISDIR | libc::EINVAL | libc::ENAMETOOLONG) => {
            ApiError::invalid(message)
        }
        _ => match err {
            FsError::Invalid(_) => ApiError::invalid(message),
            FsError::NoContainer => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "container_down", message)
            }
            FsError::Os { .. } => ApiError::internal(message),
        },
    }
}

/// The query of a file operation.
#[derive(Default)]
struct Query {
    path: Option<String>,
    working_dir: Option<String>,
    mode: Option<String>,
    mkdir: bool,
    recursive: bool,
    gzip: bool,
}

fn query(req: &axum::extract::Request) -> Result<Query, ApiError> {
    let mut q = Query::default();
    let flag = |v: &str| matches!(v, "true" | "1" | "");
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "path" => q.path = Some(v.into_owned()),
            "workingDir" => q.working_dir = Some(v.into_owned()),
            "mode" => q.mode = Some(v.into_owned()),
            "mkdir" | "mkdirParents" => q.mkdir = flag(&v),
            "recursive" => q.recursive = flag(&v),
            "gzip" => q.gzip = flag(&v),
            "asRoot" => {}
            other => {
                return Err(ApiError::invalid(format!(
                    "`{other}`: unknown parameter (see /v1/fs in the API document)"
                )));
            }
        }
    }
    Ok(q)
}

fn path_of(q: &Query) -> Result<String, ApiError> {
    let path = q
        .path
        .as_deref()
        .ok_or_else(|| ApiError::invalid("`path` is required"))?;
    absolute(q.working_dir.as_deref(), path).map_err(|e| error(&e))
}

async fn root(p: &Parts) -> Result<std::os::fd::OwnedFd, ApiError> {
    container_root(&p.current).await.map_err(|e| error(&e))
}

/// A body streamed from a channel of chunks.
fn streamed(rx: mpsc::Receiver<Bytes>) -> axum::body::Body {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    });
    axum::body::Body::from_stream(stream)
}

/// The most of a request body gathered before it goes to the file
/// thread. A body comes in frames as small as one TLS record (16 KiB); one
/// thread hand-off per frame costs more than the frames themselves.
const BATCH: usize = 4 * crate::files::CHUNK;

/// The most frames in a batch (a body of tiny chunks): one vectored write
/// takes this many.
const BATCH_FRAMES: usize = 1024;

/// The request's body into a channel of batches (an error if it breaks
/// off), until its end: the frames already arrived go together (up to
/// [`BATCH`] bytes or [`BATCH_FRAMES`] frames). When the writer gives up first (a full disk), the rest
/// of the body is read and dropped: a client that sends the whole body
/// before it reads the answer (most do) then gets the answer, not a reset.
async fn feed(req: axum::extract::Request, tx: mpsc::Sender<Batch>) {
    use futures_util::FutureExt;
    let mut body = req.into_body();
    let mut writing = true;
    let mut batch = Vec::new();
    let mut bytes = 0;
    loop {
        let next = if batch.is_empty() {
            body.frame().await
        } else if let Some(next) = body.frame().now_or_never() {
            next
        } else {
            // Nothing more has arrived: send what there is, then wait.
            bytes = 0;
            writing = tx.send(Ok(std::mem::take(&mut batch))).await.is_ok();
            continue;
        };
        match next {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && writing
                    && !data.is_empty()
                {
                    bytes += data.len();
                    batch.push(data);
                    if bytes >= BATCH || batch.len() >= BATCH_FRAMES {
                        bytes = 0;
                        writing = tx.send(Ok(std::mem::take(&mut batch))).await.is_ok();
                    }
                }
            }
            Some(Err(e)) => {
                let _ = tx.send(Err(e.to_string())).await;
                return;
            }
        }
    }
    if writing && !batch.is_empty() {
        let _ = tx.send(Ok(batch)).await;
    }
}

/// One `Range: bytes=…` of a file of `size` bytes: `(start, len)`.
/// `Ok(None)`: the whole file; `Err`: not satisfiable.
fn range(value: Option<&HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(text) = value.and_then(|h| h.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = text.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // One range is served; several get the whole file (RFC 9110 allows it).
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (s, "") => (s.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (s, e) => (
            s.parse().map_err(|_| ())?,
            e.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1)),
        ),
    };
    if size == 0 || start > end || start >= size {
        return Err(());
    }
    Ok(Some((start, end - start + 1)))
}

/// `GET /v1/fs/read`.
pub(super) async fn read(p: &Parts, req: axum::extract::Request) -> Result<Response, ApiError> {
    let q = query(&req)?;
    let path = path_of(&q)?;
    let root = root(p).await?;
    let open_path = path.clone();
    let readable = as_container(move || ops::open_read(&root, &open_path))
        .await
        .map_err(|e| error(&e))?;
    let etag =
        HeaderValue::from_str(&readable.etag).map_err(|e| ApiError::internal(e.to_string()))?;
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut().insert(header::ETAG, etag);
        return Ok(resp);
    }
    let size = readable.size;
    let (status, start, len) = match range(req.headers().get(header::RANGE), size) {
        Ok(None) => (StatusCode::OK, 0, size),
        Ok(Some((start, len))) => (StatusCode::PARTIAL_CONTENT, start, len),
        Err(()) => {
            let mut resp = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("{path} has {size} bytes"),
            )
            .into_response();
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return Ok(resp);
        }
    };
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let file = readable.file;
    tokio::task::spawn_blocking(move || ops::stream_out(file, start, len, &tx));
    let mut resp = Response::new(streamed(rx));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, etag);
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1))
                .expect("ascii"),
        );
    }
    Ok(resp)
}

/// `PUT /v1/fs/write`: the body, streamed to the file.
pub(super) async fn write(p: &Parts, req: axum::extract::Request) -> Result<Response, ApiError> {
    let q = query(&req)?;
    let path = path_of(&q)?;
    let mode = ops::parse_mode(q.mode.as_deref().unwrap_or("0644")).map_err(|e| error(&e))?;
    let root = root(p).await?;
    let (tx, mut rx) = mpsc::channel(IN_FLIGHT);
    let target = path.clone();
    let mkdir = q.mkdir;
    let job = as_container(move || ops::write(&root, &target, mode, mkdir, &mut rx));
    let ((), written) = tokio::join!(feed(req, tx), job);
    let (size, sha256) = written.map_err(|e| error(&e))?;
    Ok(body::json(
        StatusCode::OK,
        &Written {
            path,
            size,
            mode: ops::octal(mode),
            sha256,
        },
    )
    .into_response())
}

/// `GET /v1/fs/list`.
pub(super) async fn list(p: &Parts, req: axum::extract::Request) -> Result<Response, ApiError> {
    let q = query(&req)?;
    let path = path_of(&q)?;
    let root = root(p).await?;
    let at = path.clone();
    let entries = as_container(move || ops::list(&root, &at))
        .await
        .map_err(|e| error(&e))?;
    Ok(body::json(
        StatusCode::OK,
        &Listing {
            path,
            count: entries.len(),
            entries,
        },
    )
    .into_response())
}

/// `DELETE /v1/fs/delete`.
pub(super) async fn delete(p: &Parts, req: axum::extract::Request) -> Result<Response, ApiError> {
    let q = query(&req)?;
    let path = path_of(&q)?;
    let root = root(p).await?;
    let recursive = q.recursive;
    let deleted = as_container(move || ops::delete(&root, &path, recursive))
        .await
        .map_err(|e| error(&e))?;
    Ok(body::json(
        StatusCode::OK,
        &Deleted {
            count: deleted.len(),
            deleted,
        },
    )
    .into_response())
}

/// `POST /v1/fs/rename`.
pub(super) async fn rename(p: &Parts, req: axum::extract::Request) -> Result<Response, ApiError> {
    let m: Move = body::read_json(req, super::MAX_BODY, "rename").await?;
    let source = absolute(m.working_dir.as_deref(), &m.source).map_err(|e| error(&e))?;
    let dest = absolute(m.working_dir.as_deref(), &m.dest).map_err(|e| error(&e))?;
    let root = root(p).await?;
    let (s, d) = (source.clone(), dest.clone());
    as_container(move || ops::rename(&root, &s, &d))
        .await
        .map_err(|e| error(&e))?;
    Ok(body::json(StatusCode::OK, &Renamed { source, dest }).into_response())
}

/// `POST /v1/fs/copy`.
pub(super) async fn copy(p: &Parts, req: axum::extract::Request) -> Result<Response, ApiError> {
    let m: Move = body::read_json(req, super::MAX_BODY, "copy").await?;
    let source = absolute(m.working_dir.as_deref(), &m.source).map_err(|e| error(&e))?;
    let dest = absolute(m.working_dir.as_deref(), &m.dest).map_err(|e| error(&e))?;
    let root = root(p).await?;
    let recursive = m.recursive;
    let (copied, total_bytes) = as_container(move || {
        let mut copied = Vec::new();
        let bytes = ops::copy(&root, &source, &dest, recursive, &mut copied)?;
        Ok((copied, bytes))
    })
    .await
    .map_err(|e| error(&e))?;
    Ok(body::json(
        StatusCode::OK,
        &Copied {
            count: copied.len(),
            copied,
            total_bytes,
        },
    )
    .into_response())
}

/// `POST /v1/fs/chmod`.
pub(super) async fn chmod(p: &Parts, req: axum::extract::Request) -> Result<Response, ApiError> {
    let c: Chmod = body::read_json(req, super::MAX_BODY, "chmod").await?;
    let path = absolute(c.working_dir.as_deref(), &c.path).map_err(|e| error(&e))?;
    let mode = ops::parse_mode(&c.mode).map_err(|e| error(&e))?;
    let root = root(p).await?;
    let recursive = c.recursive;
    let affected = as_container(move || {
        let mut affected = Vec::new();
        ops::chmod(&root, &path, mode, recursive, &mut affected)?;
        Ok(affected)
    })
    .await
    .map_err(|e| error(&e))?;
    Ok(body::json(
        StatusCode::OK,
        &Chmodded {
            count: affected.len(),
            affected,
        },
    )
    .into_response())
}

/// `GET /v1/fs/archive`: a tar stream of the path.
pub(super) async fn pack(p: &Parts, req: axum::extract::Request) -> Result<Response, ApiError> {
    let q = query(&req)?;
    let path = path_of(&q)?;
    let root = root(p).await?;
    // The path must exist: say so before the stream starts.
    let (check_root, check_path) = (
        root.try_clone()
            .map_err(|e| ApiError::internal(e.to_string()))?,
        path.clone(),
    );
    as_container(move || ops::list(&check_root, &check_path).map(|_| ()))
        .await
        .map_err(|e| error(&e))?;
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let gzip = q.gzip;
    tokio::spawn(async move {
        if let Err(err) = as_container(move || archive::pack(&root, &path, gzip, &tx)).await {
            tracing::debug!(%err, "an archive stream ended early");
        }
    });
    let mut resp = Response::new(streamed(rx));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if gzip {
            "application/gzip"
        } else {
            "application/x-tar"
        }),
    );
    Ok(resp)
}

/// `PUT /v1/fs/archive`: a tar stream extracted into the path.
pub(super) async fn unpack(p: &Parts, req: axum::extract::Request) -> Result<Response, ApiError> {
    let q = query(&req)?;
    let path = path_of(&q)?;
    let root = root(p).await?;
    let (tx, mut rx) = mpsc::channel(IN_FLIGHT);
    let gzip = q.gzip;
    let job = as_container(move || archive::unpack(&root, &path, gzip, &mut rx));
    let ((), extracted) = tokio::join!(feed(req, tx), job);
    Ok(body::json(StatusCode::OK, &extracted.map_err(|e| error(&e))?).into_response())
}

/// `GET /v1/fs/watch`: a WebSocket of JSON events.
pub(super) async fn watch(p: &Parts, req: axum::extract::Request) -> Result<Response, ApiError> {
    let q = query(&req)?;
    let path = path_of(&q)?;
    let root = root(p).await?;
    let ws = WebSocketUpgrade::from_request(req, &())
        .await
        .map_err(|r| ApiError::invalid(format!("a watch is a WebSocket: {r}")))?;
    let (tx, mut rx) = mpsc::channel(256);
    let recursive = q.recursive;
    // Started before the upgrade, so a path that cannot be watched is an
    // error answer, not a silent socket.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    tokio::spawn(async move {
        let first = tx.clone();
        let result = as_container(move || watch::watch(&root, &path, recursive, &first)).await;
        if let Err(err) = result {
            let _ = ready_tx.send(Err(err.to_string()));
        }
        drop(tx);
    });
    // A moment for the first watch to fail (a missing path).
    if let Ok(Ok(Err(why))) =
        tokio::time::timeout(std::time::Duration::from_millis(300), ready_rx).await
    {
        return Err(ApiError::not_found(why));
    }
    Ok(ws
        .on_upgrade(move |mut socket| async move {
            while let Some(event) = rx.recv().await {
                let text = serde_json::to_string(&event).expect("serializes");
                if socket.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            let _ = socket.close().await;
        })
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(range(None, 10), Ok(None));
        assert_eq!(range(Some(&h("bytes=0-3")), 10), Ok(Some((0, 4))));
        assert_eq!(range(Some(&h("bytes=5-")), 10), Ok(Some((5, 5))));
        assert_eq!(range(Some(&h("bytes=-3")), 10), Ok(Some((7, 3))));
        assert_eq!(range(Some(&h("bytes=8-100")), 10), Ok(Some((8, 2))));
        assert_eq!(range(Some(&h("bytes=10-")), 10), Err(()));
        assert_eq!(range(Some(&h("bytes=x-1")), 10), Err(()));
        assert_eq!(range(Some(&h("bytes=0-1,3-4")), 10), Ok(None));
    }
}
