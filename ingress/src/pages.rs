//! The pages the proxy answers with itself, worded for the person who
//! deployed the app: what happened and what to do.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::proxy::Body;

fn page(status: StatusCode, title: &str, text: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{status} {title}</title></head>\
         <body><h1>{title}</h1><p>{text}</p><hr><p>nestbox ingress</p></body></html>\n"
    );
    let mut resp = Response::new(
        Full::new(Bytes::from(html))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// An empty body (a 101 answer).
#[must_use]
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// 404: nothing is published under this name.
#[must_use]
pub fn no_route(host: &str) -> Response<Body> {
    page(
        StatusCode::NOT_FOUND,
        "No service here",
        &format!(
            "No service is published on <b>{}</b>. Start an app listening on a TCP port in the \
             sandbox and it will appear at its URL.",
            escape(host)
        ),
    )
}

/// 502: the backend refused or reset.
#[must_use]
pub fn not_listening(port: u16) -> Response<Body> {
    page(
        StatusCode::BAD_GATEWAY,
        "App not reachable",
        &format!(
            "The app is not listening on port {port}: start it, or check that it did not crash."
        ),
    )
}

/// 502: the backend broke the exchange.
#[must_use]
pub fn backend_failed(port: u16) -> Response<Body> {
    page(
        StatusCode::BAD_GATEWAY,
        "App failed",
        &format!("The app on port {port} closed the connection without a valid answer."),
    )
}

/// 504: the backend did not answer in time.
#[must_use]
pub fn too_slow(port: u16, secs: u64) -> Response<Body> {
    page(
        StatusCode::GATEWAY_TIMEOUT,
        "App too slow",
        &format!("The app on port {port} did not answer within {secs} s."),
    )
}

/// 400: a request the proxy will not forward.
#[must_use]
pub fn bad_request(why: &str) -> Response<Body> {
    page(StatusCode::BAD_REQUEST, "Bad request", &escape(why))
}

/// 401: a private URL asked for without (valid) credentials.
#[must_use]
pub fn unauthorized(host: &str, how: &str) -> Response<Body> {
    let mut resp = page(
        StatusCode::UNAUTHORIZED,
        "This URL is private",
        &format!("<b>{}</b> is private. {}", escape(host), escape(how)),
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"nestbox\""),
    );
    resp
}

/// 403: a login or share link that does not work (any more).
#[must_use]
pub fn auth_refused(why: &str) -> Response<Body> {
    page(StatusCode::FORBIDDEN, "Link refused", &escape(why))
}

/// 500: a gated route with no URL auth to check it (fails closed).
#[must_use]
pub fn no_access() -> Response<Body> {
    page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "URL auth unavailable",
        "This URL is private and the ingress has no URL auth configured to check who is calling.",
    )
}
