//! `nb-backend ADDR`: the app behind the proxy in ingress tests and benches.
//!
//! - `GET /hello` → `hello from nb-backend`
//! - `GET /headers` → the request's headers, one `name: value` a line
//! - `GET /bytes?n=N` → N bytes of a fixed pattern, streamed
//! - `POST /echo` → the request body, streamed back as it arrives
//! - `GET /slow?ms=N` → answers after N ms
//! - `GET /ws` with `Upgrade: websocket` → 101, then every byte echoed

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, s: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(s)).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// The pattern byte at offset `i` (what `/bytes` sends).
fn pattern(i: u64) -> u8 {
    u8::try_from((i * 31 + 7) % 251).expect("below 251")
}

async fn handle(mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    Ok(match req.uri().path() {
        "/hello" => text(StatusCode::OK, "hello from nb-backend\n".into()),
        "/headers" => {
            let mut out = String::new();
            for (k, v) in req.headers() {
                let _ = writeln!(out, "{k}: {}", v.to_str().unwrap_or("?"));
            }
            text(StatusCode::OK, out)
        }
        "/bytes" => {
            let n = query(&req, "n").unwrap_or(0);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
            tokio::spawn(async move {
                let mut sent = 0u64;
                while sent < n {
                    let len = (n - sent).min(64 * 1024);
                    let chunk: Vec<u8> = (sent..sent + len).map(pattern).collect();
                    if tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.is_err() {
                        return;
                    }
                    sent += len;
                }
            });
            let stream = futures_stream(rx);
            Response::new(BodyExt::boxed(stream))
        }
        "/echo" => Response::new(req.into_body().boxed()),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(0))).await;
            text(StatusCode::OK, "slow\n".into())
        }
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = upgrade.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut r = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
            r.headers_mut()
                .insert("connection", "upgrade".parse().expect("valid"));
            r.headers_mut()
                .insert("upgrade", "websocket".parse().expect("valid"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "no such path\n".into()),
    })
}

/// An mpsc receiver as a stream of body frames.
fn futures_stream(
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, hyper::Error>>,
) -> impl hyper::body::Body<Data = Bytes, Error = hyper::Error> {
    struct Rx(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, hyper::Error>>);
    impl hyper::body::Body for Rx {
        type Data = Bytes;
        type Error = hyper::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            self.0.poll_recv(cx)
        }
    }
    Rx(rx)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {addr}");
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(handle))
                .with_upgrades()
                .await;
        });
    }
}
