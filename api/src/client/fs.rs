//! Files from the client's side: streamed uploads and downloads of any
//! size (a few 64 KiB chunks in memory), listings, archives, watches.

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use super::{Client, ClientError, api_error, collect, whole};
use crate::fs::{Extracted, Listing, WatchEvent, Written};

/// The size of each chunk sent.
const CHUNK: usize = 64 << 10;

fn query(path: &str, extra: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("path", path);
    for (k, v) in extra {
        q.append_pair(k, v);
    }
    q.finish()
}

type Frames =
    futures_util::stream::BoxStream<'static, Result<hyper::body::Frame<Bytes>, std::io::Error>>;

impl Client {
    /// Sends a request whose body is `reader`'s bytes, streamed; answers the
    /// guest's whole (small) answer.
    async fn upload<R>(
        &self,
        method: Method,
        path_and_query: &str,
        reader: R,
    ) -> Result<Bytes, ClientError>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let stream = futures_util::stream::unfold(
            (reader, vec![0u8; CHUNK]),
            |(mut r, mut buf)| async move {
                match r.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        let frame = hyper::body::Frame::data(Bytes::copy_from_slice(&buf[..n]));
                        Some((Ok(frame), (r, buf)))
                    }
                    Err(e) => Some((Err(e), (r, buf))),
                }
            },
        );
        let frames: Frames = Box::pin(stream);
        let req = self
            .request(method, path_and_query)
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(http_body_util::StreamBody::new(frames))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        whole(self.round_trip(req).await?).await
    }

    /// A GET whose answer body is streamed into `writer`; answers the
    /// status, the headers and the bytes written.
    async fn download<W>(
        &self,
        path_and_query: &str,
        headers: &[(http::HeaderName, String)],
        writer: &mut W,
    ) -> Result<(StatusCode, HeaderMap, u64), ClientError>
    where
        W: AsyncWrite + Unpin,
    {
        let mut req = self.request(Method::GET, path_and_query);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = req
            .body(http_body_util::Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = self.round_trip(req).await?;
        let status = resp.status();
        let head = resp.headers().clone();
        let mut body = resp.into_body();
        if !status.is_success() {
            return Err(api_error(status, &collect(body).await?));
        }
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Http(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                writer
                    .write_all(&data)
                    .await
                    .map_err(|e| ClientError::Http(format!("writing the download: {e}")))?;
                n += data.len() as u64;
            }
        }
        writer
            .flush()
            .await
            .map_err(|e| ClientError::Http(format!("writing the download: {e}")))?;
        Ok((status, head, n))
    }

    /// Writes `reader` to `path` in the container (`mode` octal).
    ///
    /// # Errors
    /// [`ClientError`]: 507 `insufficient_storage` when the disk is full.
    pub async fn fs_write<R>(
        &self,
        path: &str,
        mode: &str,
        mkdir: bool,
        reader: R,
    ) -> Result<Written, ClientError>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let q = query(
            path,
            &[
                ("mode", mode),
                ("mkdirParents", if mkdir { "true" } else { "false" }),
            ],
        );
        let what = format!("PUT /v1/fs/write?{q}");
        let body = self
            .upload(Method::PUT, &format!("/v1/fs/write?{q}"), reader)
            .await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            what,
            why: e.to_string(),
        })
    }

    /// Reads `path` (or the `range`, `bytes=A-B`) into `writer`; answers
    /// the status (200 or 206), the headers (`ETag`, `Content-Range`) and
    /// the bytes.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn fs_read<W>(
        &self,
        path: &str,
        range: Option<&str>,
        writer: &mut W,
    ) -> Result<(StatusCode, HeaderMap, u64), ClientError>
    where
        W: AsyncWrite + Unpin,
    {
        let headers: Vec<(http::HeaderName, String)> = range
            .map(|r| (http::header::RANGE, r.to_owned()))
            .into_iter()
            .collect();
        self.download(
            &format!("/v1/fs/read?{}", query(path, &[])),
            &headers,
            writer,
        )
        .await
    }

    /// Lists `path`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn fs_list(&self, path: &str) -> Result<Listing, ClientError> {
        self.json(
            Method::GET,
            &format!("/v1/fs/list?{}", query(path, &[])),
            None::<&()>,
        )
        .await
    }

    /// Deletes `path` (with `recursive`, a tree).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn fs_delete(
        &self,
        path: &str,
        recursive: bool,
    ) -> Result<crate::fs::Deleted, ClientError> {
        let q = query(
            path,
            &[("recursive", if recursive { "true" } else { "false" })],
        );
        self.json(Method::DELETE, &format!("/v1/fs/delete?{q}"), None::<&()>)
            .await
    }

    /// `path` as a tar stream (gzipped with `gzip`) into `writer`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn fs_archive_get<W>(
        &self,
        path: &str,
        gzip: bool,
        writer: &mut W,
    ) -> Result<u64, ClientError>
    where
        W: AsyncWrite + Unpin,
    {
        let q = query(path, &[("gzip", if gzip { "true" } else { "false" })]);
        Ok(self
            .download(&format!("/v1/fs/archive?{q}"), &[], writer)
            .await?
            .2)
    }

    /// Extracts the tar stream of `reader` into the directory `path`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn fs_archive_put<R>(
        &self,
        path: &str,
        gzip: bool,
        reader: R,
    ) -> Result<Extracted, ClientError>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let q = query(path, &[("gzip", if gzip { "true" } else { "false" })]);
        let what = format!("PUT /v1/fs/archive?{q}");
        let body = self
            .upload(Method::PUT, &format!("/v1/fs/archive?{q}"), reader)
            .await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            what,
            why: e.to_string(),
        })
    }

    /// Watches `path`: `each` gets every event until it answers `false` or
    /// the watch ends.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn fs_watch(
        &self,
        path: &str,
        recursive: bool,
        mut each: impl FnMut(WatchEvent) -> bool,
    ) -> Result<(), ClientError> {
        let q = query(
            path,
            &[("recursive", if recursive { "true" } else { "false" })],
        );
        let mut ws = self.upgrade(&format!("/v1/fs/watch?{q}")).await?;
        while let Some(msg) = ws.next().await {
            match msg.map_err(|e| ClientError::WebSocket(e.to_string()))? {
                Message::Text(t) => {
                    let event: WatchEvent = serde_json::from_str(&t).map_err(|e| {
                        ClientError::WebSocket(format!("a watch frame is not valid: {e}"))
                    })?;
                    if !each(event) {
                        return Ok(());
                    }
                }
                Message::Close(_) => return Ok(()),
                _ => {}
            }
        }
        Ok(())
    }
}
