//! `GET /v1/proxy`: a TCP connection to a port inside the inner container,
//! over a WebSocket (Sprites' wire format, see [`nestbox_api::proxy`]).
//! The connection is made in the container's network namespace, by a
//! socket thread of that namespace, so a listener on the container's
//! loopback is reachable, exactly as it is to the container's own code.
#![deny(clippy::disallowed_methods)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequest;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use nestbox_api::proxy::{ProxyInit, ProxyStatus};
use nestbox_ingress::dial::Dialers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ApiError, Parts};
use crate::bounce::Current;

/// How long the client has for its first frame, and the dial for its
/// connection.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest binary frame either way (Sprites' is 32 KiB).
const FRAME: usize = 32 << 10;
/// WebSocket close codes Sprites' guest uses: bad init, failed dial.
const CLOSE_BAD_INIT: u16 = 1003;
const CLOSE_DIAL: u16 = 1011;

/// `GET /v1/proxy`.
pub(super) async fn open(p: &Parts, req: axum::extract::Request) -> Response {
    let ws = match WebSocketUpgrade::from_request(req, &()).await {
        Ok(ws) => ws,
        Err(rejection) => {
            return ApiError::invalid(format!(
                "a tunnel is a WebSocket (one per TCP connection): {rejection}"
            ))
            .into_response();
        }
    };
    let (current, dialers) = (p.current.clone(), p.dialers.clone());
    ws.max_message_size(1 << 20)
        .on_upgrade(move |socket| tunnel(socket, current, dialers))
        .into_response()
}

async fn close(ws: &mut WebSocket, code: u16, why: &str) {
    let status = ProxyStatus {
        status: "error".into(),
        target: None,
        error: Some(why.to_owned()),
    };
    let text = serde_json::to_string(&status).expect("serializes");
    let _ = ws.send(Message::Text(text.into())).await;
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: why.chars().take(120).collect::<String>().into(),
        })))
        .await;
}

/// The address of `init` as the container sees it.
fn target(init: &ProxyInit) -> Result<SocketAddr, String> {
    if init.port == 0 {
        return Err("port 0 is not a port".into());
    }
    let host = init.host.trim();
    let ip = if host.is_empty() || host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| {
                format!("{host:?} is not localhost or an IP address of the container's network")
            })?
    };
    Ok(SocketAddr::new(ip, init.port))
}

async fn tunnel(mut ws: WebSocket, current: Current, dialers: Arc<Dialers>) {
    let init = match tokio::time::timeout(INIT_TIMEOUT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<ProxyInit>(&t) {
            Ok(init) => init,
            Err(e) => {
                return close(
                    &mut ws,
                    CLOSE_BAD_INIT,
                    &format!("Invalid JSON in initialization message: {e}"),
                )
                .await;
            }
        },
        _ => {
            return close(
                &mut ws,
                CLOSE_BAD_INIT,
                "Expected JSON initialization message {\"host\", \"port\"}",
            )
            .await;
        }
    };
    let addr = match target(&init) {
        Ok(a) => a,
        Err(why) => return close(&mut ws, CLOSE_BAD_INIT, &why).await,
    };
    let tcp = match dial(&current, &dialers, addr).await {
        Ok(s) => s,
        Err(why) => return close(&mut ws, CLOSE_DIAL, &why).await,
    };
    let connected = ProxyStatus {
        status: "connected".into(),
        target: Some(addr.to_string()),
        error: None,
    };
    let text = serde_json::to_string(&connected).expect("serializes");
    if ws.send(Message::Text(text.into())).await.is_err() {
        return;
    }
    relay(ws, tcp).await;
}

/// Connects to `addr` in the current container's network namespace.
async fn dial(
    current: &Current,
    dialers: &Arc<Dialers>,
    addr: SocketAddr,
) -> Result<tokio::net::TcpStream, String> {
    let Some(container) = current.get() else {
        return Err("the inner container is not running (see GET /v1/status)".into());
    };
    let netns = container.netns_path();
    drop(container);
    let dialer = if let Some(d) = dialers.cached(&netns) {
        d
    } else {
        let d = dialers.clone();
        tokio::task::spawn_blocking(move || d.get(&netns).map_err(|e| e.to_string()))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
            .map_err(|e| format!("Failed to connect to target: {e}"))?
    };
    nestbox_ingress::dial::connect(Some(&dialer), addr, INIT_TIMEOUT)
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                format!("Failed to connect to target: nothing listens on {addr} in the container")
            } else {
                format!("Failed to connect to target {addr}: {e}")
            }
        })
}

/// Bytes both ways until either side ends (Sprites models no half-close).
async fn relay(ws: WebSocket, tcp: tokio::net::TcpStream) {
    let (mut tcp_rx, mut tcp_tx) = tcp.into_split();
    let (mut ws_tx, mut ws_rx) = ws.split();
    let up = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(data) if tcp_tx.write_all(&data).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = tcp_tx.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0; FRAME];
        loop {
            match tcp_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.send(Message::Close(None)).await;
    };
    // Either side closing ends both (Sprites models no half-close).
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_localhost_or_addresses() {
        let t = |host: &str, port| {
            target(&ProxyInit {
                host: host.into(),
                port,
            })
        };
        assert_eq!(t("", 5432).unwrap().to_string(), "127.0.0.1:5432");
        assert_eq!(t("localhost", 22).unwrap().to_string(), "127.0.0.1:22");
        assert_eq!(t("10.0.0.2", 80).unwrap().to_string(), "10.0.0.2:80");
        assert_eq!(t("[::1]", 80).unwrap().to_string(), "[::1]:80");
        assert!(t("db.internal", 80).is_err());
        assert!(t("localhost", 0).is_err());
    }
}
