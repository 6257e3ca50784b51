//! The HTTP/1.1 client the proxy speaks to backends with, and the
//! kept-alive connections it reuses.
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
//! connection still fails before any response byte arrives, a request is
//! sent again once on a new connection only if RFC 9110 §9.2.2 allows it:
//! an idempotent method (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) with no
//! body. A `POST` may already have run in the backend and is not repeated.
//!
//! Idle connections are closed after the idle timeout (a sweeper task
//! checks on a quarter of it), and at once when their backend loses its
//! last route ([`RouteListener`]): a bounce moves every backend into a new
//! network namespace, and a socket kept for the old one would keep that
//! namespace alive. The response timeout counts from the end of the
//! request body, so a slow upload is not a slow backend. Trailers pass
//! both ways (a request's only when its body is sent chunked).
#![deny(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

use crate::chunked::{self, Decoder, Step};
use crate::dial::{self, Dialers};
use crate::routes::{Backend, Route, RouteListener};

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
pub enum ClientError {
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
    /// No response head came within the response timeout of the request's
    /// end.
    #[error("the backend did not answer within {0:?} of the request's end")]
    Timeout(Duration),
}

struct Idle {
    io: TcpStream,
    since: Instant,
}

struct Inner {
    idle: Mutex<IdleSet>,
    dialers: Arc<Dialers>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    response_timeout: Duration,
}

#[derive(Default)]
struct IdleSet {
    by_backend: HashMap<u64, Vec<Idle>>,
    /// The backends with a route, once a route table is listened to: a
    /// connection to any other is closed rather than kept.
    live: Option<std::collections::HashSet<u64>>,
}

impl RouteListener for Inner {
    fn backends_changed(&self, live: &HashMap<u64, Backend>) {
        let gone = {
            let mut idle = self.idle.lock();
            let mut gone = Vec::new();
            idle.by_backend.retain(|id, conns| {
                let keep = live.contains_key(id);
                if !keep {
                    gone.append(conns);
                }
                keep
            });
            idle.live = Some(live.keys().copied().collect());
            gone
        };
        // Closed outside the lock.
        drop(gone);
        let namespaces: Vec<&std::path::Path> =
            live.values().filter_map(|b| b.netns.as_deref()).collect();
        self.dialers.retain(|path| namespaces.contains(&path));
    }
}

/// Idempotent methods (RFC 9110 §9.2.2): sending one twice has the effect
/// of sending it once.
fn idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// The pool; clones share it.
#[derive(Clone)]
pub struct BackendClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BackendClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendClient").finish_non_exhaustive()
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
    error: ClientError,
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

fn parse_head(buf: &[u8]) -> Result<Option<Head>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ClientError::Protocol("too many header fields"));
        }
        Err(_) => return Err(ClientError::Protocol("malformed response head")),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ClientError::Protocol("bad status code"))?;
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| ClientError::Protocol("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| ClientError::Protocol("bad header value"))?;
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
) -> Result<(Framing, bool), ClientError> {
    let status = head.status();
    let headers = head.headers();
    let mut reuse =
        head.version() == Version::HTTP_11 && !has_token(headers, &header::CONNECTION, "close");
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return if upgrade {
            Ok((Framing::Upgrade, false))
        } else {
            Err(ClientError::Protocol(
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
                return Err(ClientError::Protocol("bad Content-Length"));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| ClientError::Protocol("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ClientError::Protocol("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), reuse),
        None => (Framing::Close, false),
    })
}

impl BackendClient {
    /// A pool that gives up connecting after `connect_timeout`, waits
    /// `response_timeout` for a response head after the request's end, and
    /// closes connections idle for `idle_timeout`. Made inside a tokio
    /// runtime, it sweeps idle connections by age on its own.
    #[must_use]
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        let inner = Arc::new(Inner {
            idle: Mutex::default(),
            dialers: Arc::new(Dialers::default()),
            connect_timeout,
            idle_timeout,
            response_timeout,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    /// Keeps connections only to the backends `routes` still routes to.
    pub fn follow(&self, routes: &crate::routes::RouteTable) {
        let listener: Arc<dyn RouteListener> = self.inner.clone();
        routes.listen(&listener);
    }

    /// How many idle connections are kept (for tests and the status).
    #[must_use]
    pub fn idle_count(&self) -> usize {
        let idle = self.inner.idle.lock();
        idle.by_backend.values().map(Vec::len).sum()
    }

    /// How many backends the pool keeps anything for.
    #[must_use]
    pub fn backends(&self) -> usize {
        self.inner.idle.lock().by_backend.len()
    }

    fn checkout(&self, id: u64) -> Option<TcpStream> {
        let mut idle = self.inner.idle.lock();
        let list = idle.by_backend.get_mut(&id)?;
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
        let mut idle = self.inner.idle.lock();
        if idle.live.as_ref().is_some_and(|live| !live.contains(&id)) {
            // Its backend lost its last route while it was in use.
            return;
        }
        let list = idle.by_backend.entry(id).or_default();
        if list.len() < MAX_IDLE_PER_BACKEND {
            list.push(Idle {
                io,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, route: &Route) -> Result<TcpStream, ClientError> {
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
                        .map_err(|e| ClientError::Connect(io::Error::other(e)))?;
                    Some(made.map_err(|e| ClientError::Connect(io::Error::other(e)))?)
                }
            }
        };
        dial::connect(
            dialer.as_deref(),
            route.backend.addr,
            self.inner.connect_timeout,
        )
        .await
        .map_err(ClientError::Connect)
    }

    /// Sends `req` to the route's backend over HTTP/1.1 and returns the
    /// response head; the body streams from the backend as it is polled.
    /// A request body is sent while the response is read (a backend may
    /// answer, or echo, before the upload ends). For an upgrade request
    /// answered with 101, the body is empty and
    /// [`BackendBody::into_upgraded`] gives the connection.
    ///
    /// # Errors
    /// [`ClientError`] if no connection could be made or the exchange failed.
    pub async fn send<B>(
        &self,
        route: &Route,
        req: Request<B>,
    ) -> Result<Response<BackendBody>, ClientError>
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
            && idempotent(&parts.method)
            && let Some(io) = self.checkout(route.backend_id)
        {
            // An idempotent request without a body can be sent again as
            // it was.
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

/// Closes idle connections older than the idle timeout, on a quarter of
/// it, until the pool is dropped.
async fn sweep(pool: std::sync::Weak<Inner>) {
    let every = pool
        .upgrade()
        .map_or(Duration::from_secs(1), |p| p.idle_timeout / 4)
        .max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        let old = {
            let mut idle = inner.idle.lock();
            let now = Instant::now();
            let mut old = Vec::new();
            idle.by_backend.retain(|_, conns| {
                // Oldest first: those idle too long are a prefix.
                let stale = conns
                    .iter()
                    .take_while(|c| now.duration_since(c.since) >= inner.idle_timeout)
                    .count();
                old.extend(conns.drain(..stale));
                !conns.is_empty()
            });
            old
        };
        drop(old);
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
) -> Result<(), ClientError>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if framing == ReqFraming::Empty {
        return write_parts(io, &[head]).await.map_err(ClientError::Io);
    }
    let chunked = framing == ReqFraming::Chunked;
    let mut head = Some(head);
    let mut sent = 0u64;
    let mut trailers = None;
    while let Some(frame) = body.as_mut().frame().await {
        let frame = frame.map_err(|e| ClientError::RequestBody(e.into()))?;
        let data = match frame.into_data() {
            Ok(data) => data,
            // Only chunked coding carries trailers in HTTP/1.1.
            Err(frame) => {
                if chunked && let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if let ReqFraming::Length(n) = framing
            && sent > n
        {
            return Err(ClientError::RequestBody(
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
            .map_err(ClientError::Io)?;
    }
    if let ReqFraming::Length(n) = framing
        && sent != n
    {
        return Err(ClientError::RequestBody(
            "the body ended before its length".into(),
        ));
    }
    let (last, section): (&[u8], Bytes) = match (chunked, trailers) {
        (true, Some(t)) => (chunked::LAST_CHUNK_LINE, chunked::encode_trailers(&t)),
        (true, None) => (chunked::LAST_CHUNK, Bytes::new()),
        (false, _) => (b"", Bytes::new()),
    };
    write_parts(io, &[head.unwrap_or_default(), last, &section])
        .await
        .map_err(ClientError::Io)
}

/// The task that sends a request body; it hands back the write half, and
/// is stopped when dropped.
struct Writer(JoinHandle<Result<OwnedWriteHalf, ClientError>>);

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
    pool: &'a BackendClient,
    id: u64,
    head: Bytes,
    framing: ReqFraming,
    method: &'a Method,
    upgrade: bool,
}

impl Exchange<'_> {
    /// Reads more of the response into `buf`, within the response timeout
    /// once the request is sent (`deadline`); `None` when instead the
    /// request body's writer finished (the timeout then starts).
    async fn read_more(
        &self,
        conn: &mut Conn,
        buf: &mut BytesMut,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> Result<Option<usize>, Failed> {
        let timeout = self.pool.inner.response_timeout;
        let timed_out = |_| Failed {
            error: ClientError::Timeout(timeout),
            retry: false,
        };
        let failed = |error| Failed {
            error,
            retry: false,
        };
        let n = match conn {
            Conn::Whole(io) => {
                let until = deadline.expect("a whole request is sent");
                tokio::time::timeout_at(until, read_into(io, buf, FIRST_READ))
                    .await
                    .map_err(timed_out)?
            }
            Conn::Split(read, writer, done) => {
                if let Some(running) = writer {
                    tokio::select! {
                        n = read_into(read, buf, FIRST_READ) => n,
                        sent = &mut running.0 => {
                            *writer = None;
                            match sent {
                                Ok(Ok(write)) => *done = Some(write),
                                Ok(Err(error)) => return Err(failed(error)),
                                Err(e) => return Err(failed(ClientError::Io(io::Error::other(e)))),
                            }
                            *deadline = Some(tokio::time::Instant::now() + timeout);
                            return Ok(None);
                        }
                    }
                } else {
                    let until = deadline.expect("the writer finished");
                    tokio::time::timeout_at(until, read_into(read, buf, FIRST_READ))
                        .await
                        .map_err(timed_out)?
                }
            }
        };
        // Nothing of the response has been read: the caller decides whether
        // that makes the request safe to send again.
        n.map(Some).map_err(|e| Failed {
            error: ClientError::Io(e),
            retry: true,
        })
    }

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
                let retry = matches!(error, ClientError::Io(_));
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
        // The response timeout starts once the request is sent whole.
        let timeout = self.pool.inner.response_timeout;
        let mut deadline = match &conn {
            Conn::Whole(_) => Some(tokio::time::Instant::now() + timeout),
            Conn::Split(..) => None,
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
                    return Err(failed(ClientError::Protocol(
                        "the response head is too large",
                    )));
                }
                None => {}
            }
            let Some(n) = self
                .read_more(&mut conn, &mut buf, &mut deadline)
                .await
                .map_err(|mut f| {
                    f.retry = f.retry && !received;
                    f
                })?
            else {
                continue;
            };
            if n == 0 {
                return Err(Failed {
                    error: ClientError::Io(io::Error::new(
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
    reuse: Option<(BackendClient, u64)>,
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
    Trailers(HeaderMap),
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
                Ok(Step::End(None)) => Next::End,
                Ok(Step::End(Some(trailers))) => Next::Trailers(trailers),
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
                Next::Trailers(trailers) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
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

    async fn get(pool: &BackendClient, route: &Route) -> String {
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
        let pool = BackendClient::new(
            Duration::from_secs(2),
            Duration::from_mins(1),
            Duration::from_secs(5),
        );
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
        let pool = BackendClient::new(
            Duration::from_secs(2),
            Duration::from_mins(1),
            Duration::from_secs(5),
        );
        let req = Request::get("http://b/").body(Empty::new()).unwrap();
        let err = pool.send(&route, req).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused),
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
                    log.lock().push(req);
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

    fn bodyless(method: Method) -> Request<Empty<Bytes>> {
        Request::builder()
            .method(method)
            .uri("/")
            .body(Empty::<Bytes>::new())
            .unwrap()
    }

    fn pool() -> BackendClient {
        BackendClient::new(
            Duration::from_secs(2),
            Duration::from_mins(1),
            Duration::from_secs(5),
        )
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
        let get = bodyless;
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
            assert!(matches!(err, ClientError::Protocol(_)), "{err}");
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

    /// A backend that answers the first request of each connection and,
    /// for the second, reads it and closes without a word (a keep-alive
    /// connection that fails after the request went out). It records the
    /// method of every request it read.
    async fn answers_once_per_connection() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    for n in 0..2 {
                        let Some(req) = read_request(&mut tcp, &mut pending).await else {
                            return;
                        };
                        let method = String::from_utf8_lossy(&req)
                            .split(' ')
                            .next()
                            .unwrap()
                            .to_owned();
                        log.lock().push(method);
                        if n == 0 {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            tcp.write_all(ok).await.unwrap();
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_post_is_never_sent_twice_but_an_idempotent_request_is_resent() {
        let (addr, seen) = answers_once_per_connection().await;
        let (pool, route) = (pool(), route_to(addr));
        let req = bodyless;
        assert_eq!(
            body_of(pool.send(&route, req(Method::GET)).await.unwrap()).await,
            "ok"
        );
        // Reuses the connection; the backend read the POST (and may have
        // acted on it) before the connection failed: not sent again.
        let err = pool.send(&route, req(Method::POST)).await.unwrap_err();
        assert!(matches!(err, ClientError::Io(_)), "{err}");
        assert_eq!(*seen.lock(), ["GET", "POST"]);
        assert_eq!(
            body_of(pool.send(&route, req(Method::DELETE)).await.unwrap()).await,
            "ok"
        );
        // A DELETE on the reused connection fails the same way, and is
        // idempotent: it is sent again on a new connection.
        assert_eq!(
            body_of(pool.send(&route, req(Method::DELETE)).await.unwrap()).await,
            "ok"
        );
        assert_eq!(*seen.lock(), ["GET", "POST", "DELETE", "DELETE", "DELETE"]);
    }

    /// A body whose chunks arrive through a channel.
    struct Channel(tokio::sync::mpsc::Receiver<Frame<Bytes>>);

    impl Body for Channel {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|f| f.map(Ok))
        }
    }

    /// A backend that reads each request whole (its raw bytes go to the
    /// channel) and answers `answer`, or nothing if `None`.
    async fn reads_whole(
        answer: Option<&'static [u8]>,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut pending = Vec::new();
            let mut buf = [0u8; 4096];
            // The end of a chunked body, trailers or not.
            while pending
                .windows(4)
                .filter(|w| *w == b"\r\n\r\n")
                .nth(1)
                .is_none()
            {
                let n = tcp.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                pending.extend_from_slice(&buf[..n]);
            }
            tx.send(pending).unwrap();
            if let Some(answer) = answer {
                tcp.write_all(answer).await.unwrap();
            }
            // Keeps the connection open.
            let _ = tcp.read(&mut buf).await;
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn the_response_timeout_starts_when_the_upload_ends_and_trailers_pass() {
        let ok = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-digest: abc\r\n\r\n";
        let (addr, mut received) = reads_whole(Some(ok)).await;
        let pool = BackendClient::new(
            Duration::from_secs(2),
            Duration::from_mins(1),
            Duration::from_millis(300),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let upload = tokio::spawn(async move {
            // An upload three times longer than the response timeout.
            for _ in 0..6 {
                tx.send(Frame::data(Bytes::from_static(b"x")))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("x-sum", HeaderValue::from_static("6"));
            trailers.insert(header::HOST, HeaderValue::from_static("evil"));
            tx.send(Frame::trailers(trailers)).await.unwrap();
        });
        let req = Request::post("/up").body(Channel(rx)).unwrap();
        let resp = pool
            .send(&route_to(addr), req)
            .await
            .expect("no timeout during the upload");
        upload.await.unwrap();
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-digest"], "abc");
        assert_eq!(&collected.to_bytes()[..], b"ok");
        let wire = String::from_utf8(received.recv().await.unwrap()).unwrap();
        assert!(wire.ends_with("1\r\nx\r\n0\r\nx-sum: 6\r\n\r\n"), "{wire}");
        assert!(
            !wire.contains("evil"),
            "a forbidden trailer is dropped: {wire}"
        );

        // A backend that reads everything and never answers (a new pool:
        // the route's id would be the first backend's).
        let (addr, _received) = reads_whole(None).await;
        let pool = BackendClient::new(
            Duration::from_secs(2),
            Duration::from_mins(1),
            Duration::from_millis(300),
        );
        let started = Instant::now();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(Frame::data(Bytes::from_static(b"x")))
            .await
            .unwrap();
        drop(tx);
        let req = Request::post("/up").body(Channel(rx)).unwrap();
        let err = pool.send(&route_to(addr), req).await.unwrap_err();
        assert!(matches!(err, ClientError::Timeout(_)), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn idle_connections_go_with_their_backend_and_with_age() {
        let (addr, _) = backend().await;
        let (other, _) = backend().await;
        let routes = RouteTable::new();
        routes.insert("a.test", Backend { addr, netns: None });
        let pool = BackendClient::new(
            Duration::from_secs(2),
            Duration::from_millis(400),
            Duration::from_secs(5),
        );
        pool.follow(&routes);
        let route = routes.get("a.test").unwrap();
        assert_eq!(get(&pool, &route).await, "ok");
        assert_eq!(pool.idle_count(), 1);
        // The route moves (as a bounce moves it to a new namespace): the
        // old backend's connection is closed at once.
        routes.insert(
            "a.test",
            Backend {
                addr: other,
                netns: None,
            },
        );
        assert_eq!((pool.idle_count(), pool.backends()), (0, 0));
        // A response still being read when its backend went is not kept.
        let moved = routes.get("a.test").unwrap();
        let req = Request::get("http://b/").body(Empty::new()).unwrap();
        let resp = pool.send(&moved, req).await.unwrap();
        routes.insert("a.test", Backend { addr, netns: None });
        assert_eq!(body_of(resp).await, "ok");
        assert_eq!(pool.idle_count(), 0);
        // Connections idle longer than the idle timeout are swept.
        let route = routes.get("a.test").unwrap();
        assert_eq!(get(&pool, &route).await, "ok");
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(pool.idle_count(), 0, "swept by age");
    }

    /// A deterministic generator (xorshift64*), so a failure names its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).expect("below n")
        }
    }

    /// Responses that exercise every framing the client knows.
    const CORPUS: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nt: 1\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\n\r\nuntil close",
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
    ];

    /// Pieces a mutation splices in: framing headers, separators, digits.
    const PIECES: &[&[u8]] = &[
        b"\r\n",
        b"\n",
        b"\r",
        b":",
        b" ",
        b"\t",
        b",",
        b";",
        b"0",
        b"5",
        b"ffffffff",
        b"-1",
        b"content-length: ",
        b"transfer-encoding: chunked\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"content-length: 2\r\n",
        b"connection: close\r\n",
        b"0\r\n\r\n",
        b"\x00",
        b"\xff",
    ];

    fn mutate(rng: &mut Rng) -> Vec<u8> {
        let mut v = CORPUS[rng.below(CORPUS.len())].to_vec();
        for _ in 0..=rng.below(2) {
            let at = rng.below(v.len() + 1);
            match rng.below(5) {
                0 => {
                    if !v.is_empty() {
                        let i = rng.below(v.len());
                        v[i] = u8::try_from(rng.below(256)).expect("a byte");
                    }
                }
                1 => {
                    let piece = PIECES[rng.below(PIECES.len())];
                    v.splice(at..at, piece.iter().copied());
                }
                2 => {
                    let end = (at + rng.below(8)).min(v.len());
                    v.drain(at..end);
                }
                3 => v.truncate(at),
                _ => {
                    // A header line repeated.
                    let text = v.clone();
                    if let Some(line_end) = text.windows(2).position(|w| w == b"\r\n") {
                        let line = text[..line_end + 2].to_vec();
                        let pos = (line_end + 2).min(v.len());
                        v.splice(pos..pos, line);
                    }
                }
            }
        }
        v
    }

    /// Iterations of the fuzz tests (`NB_FUZZ_ITERS` for a longer run).
    fn iterations(default: u64) -> u64 {
        std::env::var("NB_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Fuzzes the response-head parser, the framing decision and the
    /// chunked decoder on mutated responses fed in random pieces: none may
    /// panic or loop, and what the decoder consumes never exceeds what it
    /// was given.
    #[test]
    fn fuzz_head_framing_and_chunked_decoder() {
        let mut rng = Rng(0x5eed_0001);
        for _ in 0..iterations(100_000) {
            let input = mutate(&mut rng);
            let Ok(Some(head)) = parse_head(&input) else {
                continue;
            };
            for method in [Method::GET, Method::HEAD] {
                let Ok((Framing::Chunked(mut decoder), _)) =
                    framing(&head.response, &method, rng.below(2) == 0)
                else {
                    continue;
                };
                let mut buf = BytesMut::new();
                let mut rest = &input[head.len..];
                let mut steps = 0;
                loop {
                    steps += 1;
                    assert!(steps < 100_000, "the decoder loops on {input:?}");
                    match decoder.decode(&mut buf) {
                        Ok(Step::Data(d)) => assert!(!d.is_empty()),
                        Ok(Step::End(_)) | Err(_) => break,
                        Ok(Step::NeedMore) => {
                            if rest.is_empty() {
                                break;
                            }
                            let n = 1 + rng.below(rest.len());
                            buf.extend_from_slice(&rest[..n]);
                            rest = &rest[n..];
                        }
                    }
                }
            }
        }
    }

    /// A backend that answers the request on each connection with the
    /// next response it is handed, then closes: one listener for a whole
    /// fuzz run, so that the run does not use up the ephemeral ports.
    struct Oracle {
        addr: std::net::SocketAddr,
        next: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    }

    impl Oracle {
        async fn start() -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (next, mut wires) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
            tokio::spawn(async move {
                while let Some(wire) = wires.recv().await {
                    let Ok((mut tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let mut pending = Vec::new();
                    let _ = read_request(&mut tcp, &mut pending).await;
                    let _ = tcp.write_all(&wire).await;
                }
            });
            Self { addr, next }
        }
    }

    /// What our client made of `wire`: status and body, or nothing.
    async fn ours_on(oracle: &Oracle, wire: Vec<u8>) -> Option<(u16, Vec<u8>)> {
        oracle.next.send(wire).unwrap();
        // A client of its own: no connection kept from an earlier answer.
        let resp = pool()
            .send(&route_to(oracle.addr), bodyless(Method::GET))
            .await
            .ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes().to_vec();
        Some((status, body))
    }

    async fn hypers_on(oracle: &Oracle, wire: Vec<u8>) -> Option<(u16, Vec<u8>)> {
        oracle.next.send(wire).unwrap();
        let tcp = TcpStream::connect(oracle.addr).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .ok()?;
        tokio::spawn(conn);
        let resp = sender.send_request(bodyless(Method::GET)).await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes().to_vec();
        Some((status, body))
    }

    /// Differential: every response our client accepts, hyper's reads the
    /// same way (status and body). Ours may refuse more than hyper does
    /// (it is stricter on purpose), never read one differently: that is
    /// how responses get split.
    #[tokio::test]
    async fn fuzz_differential_against_hyper() {
        let mut rng = Rng(0x5eed_0002);
        let (ours_oracle, hypers_oracle) = (Oracle::start().await, Oracle::start().await);
        let (mut accepted, mut total) = (0, 0);
        for _ in 0..iterations(2000) {
            let input = mutate(&mut rng);
            total += 1;
            let Some(ours) = ours_on(&ours_oracle, input.clone()).await else {
                continue;
            };
            accepted += 1;
            let theirs = hypers_on(&hypers_oracle, input.clone()).await;
            assert_eq!(
                Some(&ours),
                theirs.as_ref(),
                "read differently: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
        // Most mutations break a response; enough must not, or this tests
        // nothing.
        assert!(
            accepted * 10 > total,
            "the mutations are too wild: {accepted} of {total} read"
        );
        eprintln!("{accepted} of {total} mutated responses read, each as hyper reads it");
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
