//! `/v1/exec`: exec sessions over a WebSocket, Sprites' wire format with
//! nestbox's extensions (see [`nestbox_api::exec`]).
//!
//! - `GET /v1/exec` with an upgrade starts a session and attaches to it;
//!   without one it lists the sessions.
//! - `GET /v1/exec/{id}` with an upgrade attaches (`?offset=N` replays
//!   from byte N); without one it describes the session.
//! - `POST /v1/exec/{id}/kill` signals it, waits, kills what is left, and
//!   answers NDJSON as it goes.
#![deny(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequest;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use nestbox_api::exec::{Control, ExecParams, KillRequest, StreamId, signal_number};

use super::body;
use super::{ApiError, Parts};
use crate::exec::{Attached, Chunk, ExecError, Session};

/// A WebSocket close code for a process that ended with a failure (older
/// Sprites clients read a TTY's exit from the close code alone).
const CLOSE_FAILED: u16 = 1011;
/// The largest frame a client may send.
const MAX_FRAME: usize = 1 << 20;

fn error(err: &ExecError) -> ApiError {
    match err {
        ExecError::Invalid(_) => ApiError::invalid(err.to_string()),
        ExecError::NotFound(_) => ApiError::not_found(err.to_string()),
        ExecError::NoContainer => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "container_down",
            err.to_string(),
        ),
        ExecError::TooMany(_) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sessions",
            err.to_string(),
        ),
        ExecError::Spawn(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "spawn_failed", err.to_string())
        }
    }
}

fn wants_upgrade(req: &axum::extract::Request) -> bool {
    req.headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn upgrade(req: axum::extract::Request) -> Result<WebSocketUpgrade, ApiError> {
    WebSocketUpgrade::from_request(req, &())
        .await
        .map(|ws| ws.max_message_size(MAX_FRAME).max_frame_size(MAX_FRAME))
        .map_err(|rejection| ApiError::invalid(format!("not a WebSocket upgrade: {rejection}")))
}

/// `GET /v1/exec`.
pub(super) async fn list_or_start(p: &Parts, req: axum::extract::Request) -> Response {
    if !wants_upgrade(&req) {
        let sessions = p.exec.list();
        return body::json(
            StatusCode::OK,
            &nestbox_api::exec::Sessions {
                count: sessions.len(),
                sessions,
            },
        )
        .into_response();
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let params = match ExecParams::from_query(&query) {
        Ok(p) => p,
        Err(e) => return ApiError::invalid(e.to_string()).into_response(),
    };
    // An attach in Sprites' older form.
    if let Some(id) = form_id(&query) {
        return attach(p, &id, req).await;
    }
    let ws = match upgrade(req).await {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    let session = match p.exec.start(params).await {
        Ok(s) => s,
        Err(e) => return error(&e).into_response(),
    };
    let attached = session.attach(Some(0));
    ws.on_upgrade(move |socket| connection(socket, session, attached))
        .into_response()
}

fn form_id(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.into_owned())
}

/// `GET /v1/exec/{id}`.
pub(super) async fn attach(p: &Parts, id: &str, req: axum::extract::Request) -> Response {
    let session = match p.exec.get(id) {
        Ok(s) => s,
        Err(e) => return error(&e).into_response(),
    };
    if !wants_upgrade(&req) {
        return body::json(StatusCode::OK, &session.describe()).into_response();
    }
    let offset = match nestbox_api::exec::attach_offset(req.uri().query().unwrap_or("")) {
        Ok(o) => o,
        Err(e) => return ApiError::invalid(e.to_string()).into_response(),
    };
    let ws = match upgrade(req).await {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    let attached = session.attach(offset);
    ws.on_upgrade(move |socket| connection(socket, session, attached))
        .into_response()
}

/// `POST /v1/exec/{id}/kill`: the request in a JSON body, or Sprites'
/// query (`signal`, `timeout` as a duration).
pub(super) async fn kill(
    p: &Parts,
    id: &str,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let session = p.exec.get(id).map_err(|e| error(&e))?;
    let query = req.uri().query().unwrap_or("").to_owned();
    let has_body = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|v| v != "0")
        || req.headers().contains_key(http::header::TRANSFER_ENCODING);
    let mut request: KillRequest = if has_body {
        body::read_json(req, super::MAX_BODY, "a kill request").await?
    } else {
        KillRequest::default()
    };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "signal" => request.signal = Some(v.into_owned()),
            "timeout" => {
                let d = humantime::parse_duration(&v)
                    .or_else(|_| v.parse::<u64>().map(Duration::from_secs))
                    .map_err(|_| {
                        ApiError::invalid(format!("`timeout`: {v:?} is not a duration"))
                    })?;
                request.grace_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "`{other}`: unknown parameter (signal, timeout)"
                )));
            }
        }
    }
    let signal =
        signal_number(request.signal.as_deref().unwrap_or("TERM")).map_err(ApiError::invalid)?;
    let grace = Duration::from_millis(request.grace_ms.unwrap_or(10_000));
    let (tx, resp) = body::ndjson_stream();
    let (events_tx, mut events) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move { session.kill(signal, grace, events_tx).await });
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if tx.send(body::ndjson_line(&event)).await.is_err() {
                return;
            }
        }
    });
    Ok(resp.into_response())
}

fn text(control: &Control) -> Message {
    Message::Text(
        serde_json::to_string(control)
            .expect("a control frame serializes")
            .into(),
    )
}

/// One client's connection to a session: the output from its offset, its
/// input and control frames, and the exit at the end. Dropping `attached`
/// (the connection ended) detaches, and leaves the process running.
async fn connection(socket: WebSocket, session: Arc<Session>, attached: Attached) {
    let (mut tx, mut rx) = socket.split();
    if let Err(err) = serve(&mut tx, &mut rx, &session, &attached).await {
        tracing::debug!(%err, "an exec connection ended");
    }
    drop(attached);
}

type Tx = futures_util::stream::SplitSink<WebSocket, Message>;
type Rx = futures_util::stream::SplitStream<WebSocket>;

async fn serve(
    tx: &mut Tx,
    rx: &mut Rx,
    session: &Arc<Session>,
    attached: &Attached,
) -> Result<(), axum::Error> {
    tx.send(text(&Control::SessionInfo(attached.info.clone())))
        .await?;
    if let Some((from, to)) = attached.gap {
        tx.send(text(&Control::Gap { from, to })).await?;
    }
    if let Some(screen) = &attached.screen {
        tx.send(Message::Binary(screen.clone().into())).await?;
    }
    let tty = session.tty();
    let mut offset = attached.info.offset;
    let mut progress = session.progress();
    let mut exit = session.exit_status();
    loop {
        // Everything there is, from this connection's offset.
        loop {
            match session.read(offset).await {
                Chunk::Data(stream, data) => {
                    offset += data.len() as u64;
                    let frame = if tty {
                        data
                    } else {
                        let mut f = Vec::with_capacity(data.len() + 1);
                        f.push(stream as u8);
                        f.extend_from_slice(&data);
                        f
                    };
                    tx.send(Message::Binary(frame.into())).await?;
                }
                Chunk::Gap(to) => {
                    tx.send(text(&Control::Gap { from: offset, to })).await?;
                    offset = to;
                }
                Chunk::End => break,
            }
        }
        let ended = exit.borrow_and_update().clone();
        if let Some(status) = ended
            && matches!(session.read(offset).await, Chunk::End)
        {
            tx.send(text(&Control::Exit(status.clone()))).await?;
            if !tty {
                tx.send(Message::Binary(
                    vec![StreamId::Exit as u8, status.code_byte()].into(),
                ))
                .await?;
            }
            let code = if status.exit_code == 0 {
                1000
            } else {
                CLOSE_FAILED
            };
            let _ = tx
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: format!("exit {}", status.exit_code).into(),
                })))
                .await;
            return Ok(());
        }
        tokio::select! {
            _ = progress.changed() => {}
            _ = exit.changed() => {}
            msg = rx.next() => match msg {
                None | Some(Ok(Message::Close(_))) => return Ok(()),
                Some(Err(err)) => return Err(err),
                Some(Ok(msg)) => incoming(msg, session, attached, tty).await,
            },
        }
    }
}

/// A frame from the client.
async fn incoming(msg: Message, session: &Session, attached: &Attached, tty: bool) {
    match msg {
        Message::Binary(data) if tty => session.input(&data).await,
        Message::Binary(data) => match data.first().copied().and_then(StreamId::from_byte) {
            Some(StreamId::Stdin) => session.input(&data[1..]).await,
            Some(StreamId::StdinEof) => session.close_stdin().await,
            _ => {}
        },
        Message::Text(t) => match serde_json::from_str::<Control>(&t) {
            Ok(Control::Resize { rows, cols }) => attached.resize(rows, cols),
            Ok(Control::Signal { signal }) => match signal_number(&signal) {
                Ok(n) => {
                    if let Err(err) = session.signal(n) {
                        tracing::debug!(%err, "a session's signal");
                    }
                }
                Err(why) => tracing::debug!(%why, "a session's signal"),
            },
            // Unknown or guest-side frames: Sprites' clients send some
            // (`stdin_eof` among them) that mean nothing more here.
            _ => {
                if t.contains("\"stdin_eof\"") {
                    session.close_stdin().await;
                }
            }
        },
        _ => {}
    }
}
