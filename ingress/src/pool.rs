//! Kept-alive HTTP/1.1 connections to backends, and the HTTP/1.1 client
//! that speaks over them.
//!
//! The client is ours rather than hyper's: the request is written and the
//! response read by the task that handles the request, and the response
//! body is read from the socket by whoever polls it. There is no
//! per-connection task, no channel between tasks and no buffer held by an
//! idle connection, which is what a proxy with hundreds of backend
//! connections in flight spends its memory and wake-ups on.
//!
//! A connection returns to the pool when its response body has been read to
//! the end; one whose response is delimited by close, that said
//! `Connection: close`, or whose body was not read to the end, is closed.
//! Before reuse, a pooled connection that the backend closed while it was
//! idle is noticed (its socket became readable) and dropped; if a reused
//! connection still fails before any response byte arrives, a request
//! without a body is sent again once on a new connection.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

use crate::chunked::{self, Decoder, Step};
use crate::dial::{self, Dialers};
use crate::routes::Route;

/// Idle connections kept per backend at most.
const MAX_IDLE_PER_BACKEND: usize = 512;
/// Largest response head accepted from a backend.
const MAX_HEAD: usize = 64 * 1024;
/// Most response header fields accepted from a backend.
const MAX_HEADERS: usize = 128;
/// First read size of a response; doubled while reads fill it, up to
/// `MAX_READ`, so large bodies move in few system calls.
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a backend exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made.
    #[error("cannot connect to the backend: {0}")]
    Connect(#[source] io::Error),
    /// The connection failed during the exchange.
    #[error("the connection to the backend failed: {0}")]
    Io(#[source] io::Error),
    /// The backend's answer is not valid HTTP/1.1.
    #[error("the backend's response is not valid HTTP/1.1: {0}")]
    Protocol(&'static str),
    /// Reading the client's request body failed.
    #[error("the request body could not be read: {0}")]
    RequestBody(#[source] BoxError),
}

struct Idle {
    io: TcpStream,
    since: Instant,
}

struct Inner {
    idle: Mutex<HashMap<u64, Vec<Idle>>>,
    dialers: Arc<Dialers>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

/// The pool; clones share it.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

/// Whether an idle connection still looks usable: not readable (a closed
/// or talking backend makes it readable), probed without blocking.
fn still_open(io: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// How the request body is framed toward the backend.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReqFraming {
    Empty,
    Length(u64),
    Chunked,
}

/// The request head in HTTP/1.1 wire form.
fn encode_head(parts: &http::request::Parts, framing: ReqFraming) -> BytesMut {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let mut head = BytesMut::with_capacity(256 + parts.headers.len() * 48);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.extend_from_slice(b" ");
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::EXPECT
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match framing {
        ReqFraming::Empty => {
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                head.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        ReqFraming::Length(n) => {
            head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        ReqFraming::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// A failed exchange, and whether it may be sent again on a new connection
/// (nothing was received and the request had no body).
struct Failed {
    error: PoolError,
    retry: bool,
}

/// How a response body is delimited.
#[derive(Debug)]
enum Framing {
    Length(u64),
    Chunked(Decoder),
    Close,
    Upgrade,
}

/// A parsed response head.
struct Head {
    response: Response<()>,
    len: usize,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, PoolError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(PoolError::Protocol("too many header fields"));
        }
        Err(_) => return Err(PoolError::Protocol("malformed response head")),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(PoolError::Protocol("bad status code"))?;
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| PoolError::Protocol("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| PoolError::Protocol("bad header value"))?;
        map.append(name, value);
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    *response.headers_mut() = map;
    Ok(Some(Head { response, len }))
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The body framing of a response (RFC 9112 §6.3) and whether the
/// connection can carry another request after it.
fn framing(
    head: &Response<()>,
    method: &Method,
    upgrade: bool,
) -> Result<(Framing, bool), PoolError> {
    let status = head.status();
    let headers = head.headers();
    let mut reuse =
        head.version() == Version::HTTP_11 && !has_token(headers, &header::CONNECTION, "close");
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return if upgrade {
            Ok((Framing::Upgrade, false))
        } else {
            Err(PoolError::Protocol(
                "101 to a request that asked for no upgrade",
            ))
        };
    }
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Length(0), reuse));
    }
    if let Some(te) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        // Transfer-Encoding wins over Content-Length, and a message that has
        // both is not trusted to leave the connection in a known state.
        if headers.contains_key(header::CONTENT_LENGTH) {
            reuse = false;
        }
        let last = te
            .to_str()
            .unwrap_or_default()
            .rsplit(',')
            .next()
            .unwrap_or_default();
        return Ok(if last.trim().eq_ignore_ascii_case("chunked") {
            (Framing::Chunked(Decoder::default()), reuse)
        } else {
            (Framing::Close, false)
        });
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(PoolError::Protocol("bad Content-Length"));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| PoolError::Protocol("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(PoolError::Protocol("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), reuse),
        None => (Framing::Close, false),
    })
}

impl Pool {
    /// A pool that gives up connecting after `connect_timeout` and drops
    /// connections idle for `idle_timeout`.
    #[must_use]
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                idle: Mutex::default(),
                dialers: Arc::new(Dialers::default()),
                connect_timeout,
                idle_timeout,
            }),
        }
    }

    fn checkout(&self, id: u64) -> Option<TcpStream> {
        let mut idle = self.inner.idle.lock().expect("pool lock");
        let list = idle.get_mut(&id)?;
        let now = Instant::now();
        // Newest last: once the newest has been idle too long, all have.
        while let Some(conn) = list.pop() {
            if now.duration_since(conn.since) >= self.inner.idle_timeout {
                list.clear();
                return None;
            }
            if still_open(&conn.io) {
                return Some(conn.io);
            }
        }
        None
    }

    fn checkin(&self, id: u64, io: TcpStream) {
        let mut idle = self.inner.idle.lock().expect("pool lock");
        let list = idle.entry(id).or_default();
        if list.len() < MAX_IDLE_PER_BACKEND {
            list.push(Idle {
                io,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, route: &Route) -> Result<TcpStream, PoolError> {
        let dialer = match &route.backend.netns {
            None => None,
            Some(path) => {
                if let Some(dialer) = self.inner.dialers.cached(path) {
                    Some(dialer)
                } else {
                    // The first dial into a namespace starts its socket
                    // thread: off the runtime's workers.
                    let (dialers, path) = (self.inner.dialers.clone(), path.clone());
                    let made = tokio::task::spawn_blocking(move || dialers.get(&path))
                        .await
                        .map_err(|e| PoolError::Connect(io::Error::other(e)))?;
                    Some(made.map_err(|e| PoolError::Connect(io::Error::other(e)))?)
                }
            }
        };
        dial::connect(
            dialer.as_deref(),
            route.backend.addr,
            self.inner.connect_timeout,
        )
        .await
        .map_err(PoolError::Connect)
    }

    /// Sends `req` to the route's backend over HTTP/1.1 and returns the
    /// response head; the body streams from the backend as it is polled.
    /// A request body is sent while the response is read (a backend may
    /// answer, or echo, before the upload ends). For an upgrade request
    /// answered with 101, the body is empty and
    /// [`BackendBody::into_upgraded`] gives the connection.
    ///
    /// # Errors
    /// [`PoolError`] if no connection could be made or the exchange failed.
    pub async fn send<B>(
        &self,
        route: &Route,
        req: Request<B>,
    ) -> Result<Response<BackendBody>, PoolError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let (parts, body) = req.into_parts();
        let framing = if body.is_end_stream() {
            ReqFraming::Empty
        } else {
            body.size_hint()
                .exact()
                .map_or(ReqFraming::Chunked, ReqFraming::Length)
        };
        let exchange = Exchange {
            pool: self,
            id: route.backend_id,
            head: encode_head(&parts, framing).freeze(),
            framing,
            method: &parts.method,
            upgrade: parts.headers.contains_key(header::UPGRADE),
        };
        if framing == ReqFraming::Empty
            && let Some(io) = self.checkout(route.backend_id)
        {
            // A request without a body can be sent again as it was.
            match exchange.run(io, body).await {
                Ok(resp) => return Ok(resp),
                Err(Failed { retry: true, .. }) => {
                    tracing::debug!("a reused backend connection was closed; sending again");
                }
                Err(failed) => return Err(failed.error),
            }
            let io = self.connect(route).await?;
            return exchange
                .run(io, http_body_util::Empty::<Bytes>::new())
                .await
                .map_err(|f| f.error);
        }
        let io = match self.checkout(route.backend_id) {
            Some(io) => io,
            None => self.connect(route).await?,
        };
        exchange.run(io, body).await.map_err(|f| f.error)
    }
}

/// Writes all of `parts` with vectored writes.
async fn write_parts<W: AsyncWrite + Unpin>(io: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = io.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Reads once into `buf`, first making room for `size` bytes if less than
/// half of that is free.
async fn read_into<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    size: usize,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < size / 2 {
        buf.reserve(size);
    }
    std::future::poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)).await
}

/// Writes the head, coalesced with the first body frame, then the body
/// framed as `framing` says.
async fn write_request<W, B>(
    io: &mut W,
    head: &[u8],
    framing: ReqFraming,
    mut body: Pin<&mut B>,
) -> Result<(), PoolError>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if framing == ReqFraming::Empty {
        return write_parts(io, &[head]).await.map_err(PoolError::Io);
    }
    let chunked = framing == ReqFraming::Chunked;
    let mut head = Some(head);
    let mut sent = 0u64;
    while let Some(frame) = body.as_mut().frame().await {
        let frame = frame.map_err(|e| PoolError::RequestBody(e.into()))?;
        // Trailers are not forwarded.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if let ReqFraming::Length(n) = framing
            && sent > n
        {
            return Err(PoolError::RequestBody(
                "the body is longer than its length".into(),
            ));
        }
        let size = if chunked {
            chunked::chunk_head(data.len())
        } else {
            Bytes::new()
        };
        let end: &[u8] = if chunked { chunked::CHUNK_END } else { b"" };
        write_parts(io, &[head.take().unwrap_or_default(), &size, &data, end])
            .await
            .map_err(PoolError::Io)?;
    }
    if let ReqFraming::Length(n) = framing
        && sent != n
    {
        return Err(PoolError::RequestBody(
            "the body ended before its length".into(),
        ));
    }
    let last: &[u8] = if chunked { chunked::LAST_CHUNK } else { b"" };
    write_parts(io, &[head.unwrap_or_default(), last])
        .await
        .map_err(PoolError::Io)
}

/// The task that sends a request body; it hands back the write half, and
/// is stopped when dropped.
struct Writer(JoinHandle<Result<OwnedWriteHalf, PoolError>>);

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A backend connection: whole, or split while a request body is being
/// sent by its own task.
enum Conn {
    Whole(TcpStream),
    Split(OwnedReadHalf, Option<Writer>, Option<OwnedWriteHalf>),
}

impl Conn {
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            Conn::Whole(io) => tokio_util::io::poll_read_buf(Pin::new(io), cx, buf),
            Conn::Split(read, ..) => tokio_util::io::poll_read_buf(Pin::new(read), cx, buf),
        }
    }

    /// The whole connection, if its request was sent completely; a writer
    /// still running is stopped.
    fn into_whole(self) -> Option<TcpStream> {
        match self {
            Conn::Whole(io) => Some(io),
            Conn::Split(read, writer, done) => {
                let write = match (done, writer) {
                    (Some(write), _) => write,
                    (None, Some(mut writer)) => {
                        let mut cx = Context::from_waker(std::task::Waker::noop());
                        match Pin::new(&mut writer.0).poll(&mut cx) {
                            Poll::Ready(Ok(Ok(write))) => write,
                            _ => return None,
                        }
                    }
                    (None, None) => return None,
                };
                read.reunite(write).ok()
            }
        }
    }
}

/// One request/response exchange on one connection.
struct Exchange<'a> {
    pool: &'a Pool,
    id: u64,
    head: Bytes,
    framing: ReqFraming,
    method: &'a Method,
    upgrade: bool,
}

impl Exchange<'_> {
    /// Sends the request (a body from its own task, unless the request is
    /// an upgrade) and reads the response head.
    async fn run<B>(&self, mut io: TcpStream, body: B) -> Result<Response<BackendBody>, Failed>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let failed = |error| Failed {
            error,
            retry: false,
        };
        let mut conn = if self.framing == ReqFraming::Empty || self.upgrade {
            let body = std::pin::pin!(body);
            if let Err(error) = write_request(&mut io, &self.head, self.framing, body).await {
                let retry = matches!(error, PoolError::Io(_));
                return Err(Failed { error, retry });
            }
            Conn::Whole(io)
        } else {
            let (read, mut write) = io.into_split();
            let (head, framing) = (self.head.clone(), self.framing);
            let writer = tokio::spawn(async move {
                let body = std::pin::pin!(body);
                write_request(&mut write, &head, framing, body).await?;
                Ok(write)
            });
            Conn::Split(read, Some(Writer(writer)), None)
        };
        let mut buf = BytesMut::new();
        let mut received = false;
        let head = loop {
            match parse_head(&buf).map_err(failed)? {
                Some(head) => {
                    buf.advance(head.len);
                    let status = head.response.status();
                    // Interim responses (100 Continue, 103 Early Hints) are
                    // not passed on.
                    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                        continue;
                    }
                    break head;
                }
                None if buf.len() > MAX_HEAD => {
                    return Err(failed(PoolError::Protocol(
                        "the response head is too large",
                    )));
                }
                None => {}
            }
            let n = match &mut conn {
                Conn::Whole(io) => read_into(io, &mut buf, FIRST_READ).await,
                Conn::Split(read, writer, done) => {
                    if let Some(running) = writer {
                        tokio::select! {
                            n = read_into(read, &mut buf, FIRST_READ) => n,
                            sent = &mut running.0 => {
                                *writer = None;
                                match sent {
                                    Ok(Ok(write)) => *done = Some(write),
                                    Ok(Err(error)) => return Err(failed(error)),
                                    Err(e) => return Err(failed(PoolError::Io(io::Error::other(e)))),
                                }
                                continue;
                            }
                        }
                    } else {
                        read_into(read, &mut buf, FIRST_READ).await
                    }
                }
            }
            .map_err(|e| Failed {
                error: PoolError::Io(e),
                retry: !received,
            })?;
            if n == 0 {
                return Err(Failed {
                    error: PoolError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed the connection before answering",
                    )),
                    retry: !received,
                });
            }
            received = true;
        };
        let (framing, reuse) =
            framing(&head.response, self.method, self.upgrade).map_err(failed)?;
        let mut body = BackendBody {
            conn: Some(conn),
            buf,
            framing,
            done: false,
            reuse: reuse.then(|| (self.pool.clone(), self.id)),
            read_size: FIRST_READ,
        };
        if matches!(body.framing, Framing::Length(0)) {
            body.finish();
        }
        let (parts, ()) = head.response.into_parts();
        Ok(Response::from_parts(parts, body))
    }
}

/// A response body read from the backend connection as it is polled; the
/// connection goes back to the pool once the body has been read to its end.
pub struct BackendBody {
    conn: Option<Conn>,
    buf: BytesMut,
    framing: Framing,
    done: bool,
    reuse: Option<(Pool, u64)>,
    read_size: usize,
}

impl std::fmt::Debug for BackendBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendBody")
            .field("framing", &self.framing)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// What `poll_frame` does after looking at the buffer.
enum Next {
    Frame(Bytes),
    End,
    Fail(io::Error),
    Read,
}

impl BackendBody {
    /// For a 101 answer to an upgrade request: the backend connection and
    /// the bytes the backend sent after the head.
    #[must_use]
    pub fn into_upgraded(mut self) -> Option<(TcpStream, Bytes)> {
        if !matches!(self.framing, Framing::Upgrade) {
            return None;
        }
        let io = self.conn.take()?.into_whole()?;
        Some((io, std::mem::take(&mut self.buf).freeze()))
    }

    /// The body is complete: the connection goes back to the pool if it can
    /// carry another request, its request was sent completely, and nothing
    /// unexpected follows the body.
    fn finish(&mut self) {
        self.done = true;
        let leftover = !std::mem::take(&mut self.buf).is_empty();
        if let (Some((pool, id)), Some(conn)) = (self.reuse.take(), self.conn.take())
            && !leftover
            && let Some(io) = conn.into_whole()
        {
            pool.checkin(id, io);
        }
    }

    fn fail(&mut self) {
        self.done = true;
        self.conn = None;
        self.reuse = None;
        self.buf = BytesMut::new();
    }

    fn next_from_buffer(&mut self) -> Next {
        match &mut self.framing {
            Framing::Upgrade | Framing::Length(0) => Next::End,
            Framing::Length(left) => {
                if self.buf.is_empty() {
                    return Next::Read;
                }
                let take = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len());
                *left -= take as u64;
                Next::Frame(self.buf.split_to(take).freeze())
            }
            Framing::Chunked(decoder) => match decoder.decode(&mut self.buf) {
                Ok(Step::Data(data)) => Next::Frame(data),
                Ok(Step::End) => Next::End,
                Ok(Step::NeedMore) => Next::Read,
                Err(why) => Next::Fail(io::Error::new(io::ErrorKind::InvalidData, why)),
            },
            Framing::Close if self.buf.is_empty() => Next::Read,
            Framing::Close => Next::Frame(self.buf.split().freeze()),
        }
    }

    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(conn.poll_read_buf(cx, &mut self.buf))?;
        if n == room && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.next_from_buffer() {
                Next::Frame(data) => {
                    if matches!(this.framing, Framing::Length(0)) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Next::End => {
                    if matches!(this.framing, Framing::Upgrade) {
                        this.done = true;
                    } else {
                        this.finish();
                    }
                    return Poll::Ready(None);
                }
                Next::Fail(err) => {
                    this.fail();
                    return Poll::Ready(Some(Err(err)));
                }
                Next::Read => {}
            }
            match ready!(this.poll_read_more(cx)) {
                Ok(0) if matches!(this.framing, Framing::Close) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.fail();
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed the connection in the middle of the body",
                    ))));
                }
                Ok(_) => {}
                Err(err) => {
                    this.fail();
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || matches!(self.framing, Framing::Length(0) | Framing::Upgrade)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            _ if self.done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Upgrade => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{Backend, RouteTable};
    use http_body_util::{BodyExt, Empty, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend that answers `ok` to two requests per connection, then
    /// closes it, and counts connections.
    async fn backend() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..2 {
                        let mut head = Vec::new();
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = tcp.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            head.extend_from_slice(&buf[..n]);
                        }
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn get(pool: &Pool, route: &Route) -> String {
        let req = Request::get("http://b/").body(Empty::new()).unwrap();
        let resp = pool.send(route, req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn reuses_connections_and_replaces_closed_ones() {
        let (addr, accepted) = backend().await;
        let routes = RouteTable::new();
        routes.insert("a.test", Backend { addr, netns: None });
        let route = routes.get("a.test").unwrap();
        let pool = Pool::new(Duration::from_secs(2), Duration::from_mins(1));
        assert_eq!(get(&pool, &route).await, "ok");
        assert_eq!(get(&pool, &route).await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the second request reused the connection"
        );
        // The backend closed that connection after two requests: the next
        // request must still succeed, on a new connection.
        assert_eq!(get(&pool, &route).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn refused_connect_is_a_connect_error() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let routes = RouteTable::new();
        routes.insert(
            "a.test",
            Backend {
                addr: free,
                netns: None,
            },
        );
        let route = routes.get("a.test").unwrap();
        let pool = Pool::new(Duration::from_secs(2), Duration::from_mins(1));
        let req = Request::get("http://b/").body(Empty::new()).unwrap();
        let err = pool.send(&route, req).await.unwrap_err();
        assert!(
            matches!(&err, PoolError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused),
            "{err}"
        );
    }

    /// A backend that answers each request with the next scripted response
    /// (closing the connection after it when told to) and records what it
    /// received.
    struct Scripted {
        addr: std::net::SocketAddr,
        accepted: Arc<AtomicUsize>,
        received: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    /// Reads one request: the head, then a Content-Length or chunked body.
    async fn read_request(tcp: &mut TcpStream, pending: &mut Vec<u8>) -> Option<Vec<u8>> {
        let mut buf = [0u8; 4096];
        let complete = |p: &[u8]| -> Option<usize> {
            let head_end = p.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
            let head = String::from_utf8_lossy(&p[..head_end]).to_ascii_lowercase();
            if let Some(cl) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
            {
                let end = head_end + cl.trim().parse::<usize>().unwrap();
                return (p.len() >= end).then_some(end);
            }
            if head.contains("transfer-encoding: chunked") {
                let end = p[head_end..].windows(5).position(|w| w == b"0\r\n\r\n")?;
                return Some(head_end + end + 5);
            }
            Some(head_end)
        };
        loop {
            if let Some(end) = complete(pending) {
                return Some(pending.drain(..end).collect());
            }
            let n = tcp.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            pending.extend_from_slice(&buf[..n]);
        }
    }

    async fn scripted(script: Vec<(&'static [u8], bool)>) -> Scripted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (accepted.clone(), received.clone());
        tokio::spawn(async move {
            let mut script = script.into_iter();
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let mut pending = Vec::new();
                while let Some(req) = read_request(&mut tcp, &mut pending).await {
                    log.lock().unwrap().push(req);
                    let Some((resp, close)) = script.next() else {
                        return;
                    };
                    tcp.write_all(resp).await.unwrap();
                    if close {
                        break;
                    }
                }
            }
        });
        Scripted {
            addr,
            accepted,
            received,
        }
    }

    fn route_to(addr: std::net::SocketAddr) -> Arc<Route> {
        let routes = RouteTable::new();
        routes.insert("a.test", Backend { addr, netns: None });
        routes.get("a.test").unwrap()
    }

    async fn body_of(resp: Response<BackendBody>) -> String {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    fn pool() -> Pool {
        Pool::new(Duration::from_secs(2), Duration::from_mins(1))
    }

    #[tokio::test]
    async fn response_framings() {
        let b = scripted(vec![
            // Chunked, with an extension and a trailer; keeps the connection.
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nt: 1\r\n\r\n",
                false,
            ),
            // Interim responses are skipped; HEAD has no body.
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                false,
            ),
            // Delimited by close.
            (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
            // Connection: close after a sized body.
            (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi", false),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        ])
        .await;
        let (pool, route) = (pool(), route_to(b.addr));
        let get = |m: Method| {
            Request::builder()
                .method(m)
                .uri("/")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        assert_eq!(
            body_of(pool.send(&route, get(Method::GET)).await.unwrap()).await,
            "abcde"
        );
        let head = pool.send(&route, get(Method::HEAD)).await.unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(head.headers()[header::CONTENT_LENGTH], "5");
        assert_eq!(body_of(head).await, "");
        assert_eq!(
            b.accepted.load(Ordering::SeqCst),
            1,
            "chunked and HEAD kept the connection"
        );
        assert_eq!(
            body_of(pool.send(&route, get(Method::GET)).await.unwrap()).await,
            "until the end"
        );
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(
            body_of(pool.send(&route, get(Method::GET)).await.unwrap()).await,
            "hi"
        );
        assert_eq!(
            b.accepted.load(Ordering::SeqCst),
            2,
            "close-delimited is not reused"
        );
        let resp = pool.send(&route, get(Method::GET)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            b.accepted.load(Ordering::SeqCst),
            3,
            "Connection: close is honoured"
        );
    }

    #[tokio::test]
    async fn transfer_encoding_beats_content_length_and_ends_the_connection() {
        let b = scripted(vec![
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                false,
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n!", false),
        ])
        .await;
        let (pool, route) = (pool(), route_to(b.addr));
        let get = || Request::get("/").body(Empty::<Bytes>::new()).unwrap();
        assert_eq!(body_of(pool.send(&route, get()).await.unwrap()).await, "ok");
        assert_eq!(body_of(pool.send(&route, get()).await.unwrap()).await, "!");
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn malformed_responses_are_protocol_errors() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nx"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        ] {
            let b = scripted(vec![(bad, true)]).await;
            let req = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
            let err = pool().send(&route_to(b.addr), req).await.unwrap_err();
            assert!(matches!(err, PoolError::Protocol(_)), "{err}");
        }
        // A bad chunk is an error of the body.
        let b = scripted(vec![(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            true,
        )])
        .await;
        let req = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
        let resp = pool().send(&route_to(b.addr), req).await.unwrap();
        assert!(resp.into_body().collect().await.is_err());
    }

    #[tokio::test]
    async fn request_bodies_are_framed() {
        let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let b = scripted(vec![(ok, false), (ok, false), (ok, false)]).await;
        let (pool, route) = (pool(), route_to(b.addr));
        // Known length.
        let req = Request::post("/a")
            .header("content-length", "999")
            .header("expect", "100-continue")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        pool.send(&route, req).await.unwrap();
        // Unknown length: chunked.
        let frames = Frames([&b"ab"[..], b"", b"cde"].into());
        let req = Request::put("/b").body(frames).unwrap();
        pool.send(&route, req).await.unwrap();
        // Empty POST.
        let req = Request::post("/c").body(Empty::<Bytes>::new()).unwrap();
        pool.send(&route, req).await.unwrap();
        let got: Vec<String> = b
            .received
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect();
        assert!(got[0].starts_with("POST /a HTTP/1.1\r\n"), "{}", got[0]);
        assert!(
            got[0].ends_with("content-length: 5\r\n\r\nhello"),
            "{}",
            got[0]
        );
        assert!(
            !got[0].contains("999") && !got[0].contains("expect"),
            "{}",
            got[0]
        );
        assert!(
            got[1].ends_with("transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{}",
            got[1]
        );
        assert!(got[2].ends_with("content-length: 0\r\n\r\n"), "{}", got[2]);
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    }

    /// Data frames of unknown total length.
    struct Frames(std::collections::VecDeque<&'static [u8]>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|p| Ok(Frame::data(Bytes::from_static(p)))),
            )
        }
    }
}
