//! Response bodies: JSON documents and NDJSON streams fed from a channel.
#![deny(clippy::disallowed_methods)]

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame};
use serde::Serialize;
use tokio::sync::mpsc;

use super::error::ApiError;

/// A request's body, of at most `limit` bytes; `what` names it in the
/// error.
async fn read_bytes(
    req: axum::extract::Request,
    limit: usize,
    what: &str,
) -> Result<Bytes, ApiError> {
    Ok(http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| ApiError::invalid(format!("cannot read the {what}: {e}")))?
        .to_bytes())
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("the {what} is not valid: {e}")))
}

/// The JSON document of a request's body, of at most `limit` bytes;
/// `what` names it in the error.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    req: axum::extract::Request,
    limit: usize,
    what: &str,
) -> Result<T, ApiError> {
    parse(&read_bytes(req, limit, what).await?, what)
}

/// [`read_json`], where an empty body (no document at all) is `T`'s default.
pub async fn read_json_or_default<T: serde::de::DeserializeOwned + Default>(
    req: axum::extract::Request,
    limit: usize,
    what: &str,
) -> Result<T, ApiError> {
    let bytes = read_bytes(req, limit, what).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(&bytes, what)
}

/// The API's response body.
pub type Body = BoxBody<Bytes, Infallible>;

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("API types serialize");
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// 204 No Content.
pub fn no_content() -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

/// A body that streams what is sent into the channel, one NDJSON line per
/// message, until every sender is gone.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

/// An NDJSON stream and the sender that feeds it (serialize with
/// [`ndjson_line`]).
pub fn ndjson_stream() -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = mpsc::channel(64);
    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    (tx, resp)
}

/// One NDJSON line.
pub fn ndjson_line<T: Serialize>(value: &T) -> Bytes {
    let mut line = serde_json::to_vec(value).expect("API types serialize");
    line.push(b'\n');
    Bytes::from(line)
}
