//! A typed async client of one VM's API: HTTP/1.1 over TLS (the VM's
//! ingress at `https://api.<vm>.<domain>/`, checked against a given CA) or
//! over the API's Unix socket, with the bearer token and the version
//! header on every request, and the exec WebSocket ([`exec`]).
//!
//! One connection per request: a CLI makes a handful, and a fresh one
//! never finds a connection the guest closed meanwhile.

pub mod checkpoints;
pub mod exec;
pub mod fs;
pub mod proxy;
pub mod urls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::ErrorBody;
use crate::version::{self, VERSION_HEADER};

/// How long connecting (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The guest answered with an error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The error's code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The versions do not match.
    #[error(transparent)]
    Version(#[from] version::VersionError),
    /// The VM could not be reached.
    #[error("cannot reach {what}: {source}")]
    Connect {
        /// Where.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The CA file is not usable.
    #[error("the CA certificate {path}: {why}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// HTTP failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// An answer is not what the contract says.
    #[error("the answer to {what} is not valid: {why}")]
    Decode {
        /// The request.
        what: String,
        /// Why.
        why: String,
    },
    /// The WebSocket failed.
    #[error("WebSocket: {0}")]
    WebSocket(String),
}

/// Where a VM's API is.
#[derive(Clone, Debug)]
pub enum Transport {
    /// TLS to `addr`, for the name `host` (checked against `roots`).
    Tls {
        /// The API's host name (`api.<vm>.<domain>`).
        host: String,
        /// Where to connect (the VM's address, port 443).
        addr: SocketAddr,
        /// The CAs to trust.
        roots: Arc<rustls::RootCertStore>,
    },
    /// The API's Unix socket (inside the VM's container: `/.nestbox/api.sock`).
    Unix(PathBuf),
}

/// A WebSocket to the API.
pub(crate) type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// A stream to the API.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A client of one VM's API; cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    transport: Transport,
    token: String,
}

/// Reads the PEM certificates of `path` into a root store.
///
/// # Errors
/// [`ClientError::Ca`].
pub fn roots_from_pem(path: &Path) -> Result<Arc<rustls::RootCertStore>, ClientError> {
    let ca = |why: String| ClientError::Ca {
        path: path.to_owned(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| ca(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(cert.map_err(|e| ca(e.to_string()))?)
            .map_err(|e| ca(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca("no certificate in it".into()));
    }
    Ok(Arc::new(roots))
}

impl Client {
    /// A client over `transport` with `token`.
    #[must_use]
    pub fn new(transport: Transport, token: impl Into<String>) -> Self {
        Self {
            transport,
            token: token.into(),
        }
    }

    /// The `Host` of requests.
    fn authority(&self) -> &str {
        match &self.transport {
            Transport::Tls { host, .. } => host,
            Transport::Unix(_) => "localhost",
        }
    }

    pub(crate) async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let connect = async {
            match &self.transport {
                Transport::Tls { host, addr, roots } => {
                    let what = format!("{host} at {addr}");
                    let tcp = tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(|source| ClientError::Connect {
                            what: what.clone(),
                            source,
                        })?;
                    let _ = tcp.set_nodelay(true);
                    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| ClientError::Http(e.to_string()))?
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth();
                    let name = rustls::pki_types::ServerName::try_from(host.clone())
                        .map_err(|e| ClientError::Http(format!("{host}: {e}")))?;
                    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                        .connect(name, tcp)
                        .await
                        .map_err(|source| ClientError::Connect { what, source })?;
                    Ok(Box::new(tls) as Box<dyn Io>)
                }
                Transport::Unix(path) => {
                    let s = tokio::net::UnixStream::connect(path)
                        .await
                        .map_err(|source| ClientError::Connect {
                            what: path.display().to_string(),
                            source,
                        })?;
                    Ok(Box::new(s) as Box<dyn Io>)
                }
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ClientError::Connect {
                what: self.authority().to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            })?
    }

    /// The request headers every request carries.
    pub(crate) fn request(&self, method: Method, path_and_query: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, self.authority())
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(VERSION_HEADER, HeaderValue::from(crate::API_VERSION))
    }

    /// Opens a WebSocket at `path_and_query` (with the token and the
    /// version header); the guest's refusal is its error.
    pub(crate) async fn upgrade(&self, path_and_query: &str) -> Result<Ws, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let io = self.connect().await?;
        let mut req = format!("ws://{}{path_and_query}", self.authority())
            .into_client_request()
            .map_err(|e| ClientError::WebSocket(e.to_string()))?;
        let headers = req.headers_mut();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {}", self.token)
                .parse()
                .map_err(|_| ClientError::WebSocket("the token is not a valid header".into()))?,
        );
        headers.insert(VERSION_HEADER, HeaderValue::from(crate::API_VERSION));
        let (ws, resp) = match tokio_tungstenite::client_async(req, io).await {
            Ok(ok) => ok,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status();
                let body = resp.into_body().unwrap_or_default();
                return Err(api_error(status, &body));
            }
            Err(e) => return Err(ClientError::WebSocket(e.to_string())),
        };
        version::accept(
            resp.headers()
                .get(VERSION_HEADER)
                .and_then(|v| v.to_str().ok()),
        )?;
        Ok(ws)
    }

    /// Sends `req` on a new connection and checks the answer's version;
    /// answers the response, its body still to be read.
    pub(crate) async fn round_trip<B>(
        &self,
        req: Request<B>,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        version::accept(
            resp.headers()
                .get(VERSION_HEADER)
                .and_then(|v| v.to_str().ok()),
        )?;
        Ok(resp)
    }

    /// Sends a request; answers the status and the whole body, or the
    /// guest's error.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        json: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut req = self.request(method.clone(), path_and_query);
        if json.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(json.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = self.round_trip(req).await?;
        let status = resp.status();
        Ok((status, whole(resp).await?))
    }

    /// A request whose answer is JSON of type `T`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("a request serializes"));
        let (_, bytes) = self.send(method.clone(), path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            what: format!("{method} {path}"),
            why: e.to_string(),
        })
    }

    /// A request whose answer is NDJSON lines of type `T` (read to the end).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn ndjson<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Vec<T>, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("a request serializes"));
        let (_, bytes) = self.send(method.clone(), path, body).await?;
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice(l).map_err(|e| ClientError::Decode {
                    what: format!("{method} {path}"),
                    why: e.to_string(),
                })
            })
            .collect()
    }

    /// A streaming request whose answer is NDJSON: `each` gets every line
    /// as it comes, until it answers `false` or the stream ends.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn follow<T: DeserializeOwned>(
        &self,
        path: &str,
        each: impl FnMut(T) -> bool,
    ) -> Result<(), ClientError> {
        self.follow_with(Method::GET, path, None::<&()>, each).await
    }

    /// [`Client::follow`] with any method and an optional JSON body.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn follow_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        mut each: impl FnMut(T) -> bool,
    ) -> Result<(), ClientError> {
        let bytes = body.map_or_else(Bytes::new, |b| {
            Bytes::from(serde_json::to_vec(b).expect("a request serializes"))
        });
        let mut req = self.request(method.clone(), path);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = self.round_trip(req).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            return Err(api_error(status, &collect(body).await?));
        }
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Http(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                if line.len() <= 1 {
                    continue;
                }
                let value = serde_json::from_slice(&line).map_err(|e| ClientError::Decode {
                    what: format!("{method} {path}"),
                    why: e.to_string(),
                })?;
                if !each(value) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// `GET /v1/status`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn status(&self) -> Result<crate::types::Status, ClientError> {
        self.json(Method::GET, "/v1/status", None::<&()>).await
    }

    /// `GET /v1/ports`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn ports(&self) -> Result<Vec<crate::types::PortInfo>, ClientError> {
        self.json(Method::GET, "/v1/ports", None::<&()>).await
    }

    /// `GET /v1/exec`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn sessions(&self) -> Result<crate::exec::Sessions, ClientError> {
        self.json(Method::GET, "/v1/exec", None::<&()>).await
    }

    /// `POST /v1/exec/{id}/kill`: the steps, the last with the exit status.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn kill(
        &self,
        id: &str,
        request: &crate::exec::KillRequest,
    ) -> Result<Vec<crate::exec::KillEvent>, ClientError> {
        self.ndjson(Method::POST, &format!("/v1/exec/{id}/kill"), Some(request))
            .await
    }
}

/// A whole (small) body.
pub(crate) async fn collect(body: hyper::body::Incoming) -> Result<Bytes, ClientError> {
    Ok(body
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes())
}

/// A successful answer's whole (small) body, or the guest's error.
pub(crate) async fn whole(
    resp: http::Response<hyper::body::Incoming>,
) -> Result<Bytes, ClientError> {
    let status = resp.status();
    let body = collect(resp.into_body()).await?;
    if !status.is_success() {
        return Err(api_error(status, &body));
    }
    Ok(body)
}

/// The guest's error from an answer's body (or the body as the message).
pub(crate) fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status,
            code: e.error.code,
            message: e.error.message,
        },
        Err(_) => ClientError::Api {
            status,
            code: "http".into(),
            message: String::from_utf8_lossy(body).trim().to_owned(),
        },
    }
}
