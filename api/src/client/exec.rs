//! The exec WebSocket from the client's side: start or attach, then a
//! stream of [`Event`]s (the offset of each output byte tracked, so a
//! dropped connection can attach again from where it was) and a sender of
//! input and control frames.

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::{Client, ClientError, Ws};
use crate::exec::{Control, ExecParams, ExitStatus, SessionInfo, StreamId};

/// What comes from a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `session_info` (first on every connection).
    Info(SessionInfo),
    /// The current screen (a TTY attach without an offset): not output.
    Screen(Vec<u8>),
    /// Output of `stream` (a TTY's is `Stdout`).
    Output(StreamId, Vec<u8>),
    /// Output from `from` to `to` is lost.
    Gap {
        /// The first byte asked for.
        from: u64,
        /// The first byte that follows.
        to: u64,
    },
    /// The process ended.
    Exit(ExitStatus),
    /// The connection ended (after [`Event::Exit`], or without one: a
    /// disconnect, the session goes on).
    Closed,
}

/// Receives a session's events.
pub struct Receiver {
    rx: SplitStream<Ws>,
    tty: bool,
    offset: u64,
    screen_next: bool,
    exit: Option<ExitStatus>,
    info: Option<SessionInfo>,
}

/// Sends input and control frames to a session.
pub struct Sender {
    tx: SplitSink<Ws, Message>,
    tty: bool,
}

impl Client {
    /// Opens the exec WebSocket at `path_and_query`.
    async fn websocket(&self, path_and_query: &str) -> Result<(Sender, Receiver), ClientError> {
        let ws = self.upgrade(path_and_query).await?;
        let (tx, rx) = ws.split();
        let mut receiver = Receiver {
            rx,
            tty: false,
            offset: 0,
            screen_next: false,
            exit: None,
            info: None,
        };
        // The first text frame says what the session is.
        let info = match receiver.next().await? {
            Event::Info(info) => info,
            other => {
                return Err(ClientError::WebSocket(format!(
                    "the session's first frame is not session_info but {other:?}"
                )));
            }
        };
        Ok((Sender { tx, tty: info.tty }, receiver))
    }

    /// Starts a session and attaches to it.
    ///
    /// # Errors
    /// [`ClientError`] (the guest's error when it refuses).
    pub async fn exec(&self, params: &ExecParams) -> Result<(Sender, Receiver), ClientError> {
        self.websocket(&format!("/v1/exec?{}", params.to_query()))
            .await
    }

    /// Attaches to session `id`, from `offset` (`None`: the screen of a
    /// TTY, everything held otherwise).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn attach(
        &self,
        id: &str,
        offset: Option<u64>,
    ) -> Result<(Sender, Receiver), ClientError> {
        let query = offset.map_or_else(String::new, |o| format!("?offset={o}"));
        self.websocket(&format!("/v1/exec/{id}{query}")).await
    }
}

impl Receiver {
    /// The next event.
    ///
    /// # Errors
    /// [`ClientError::WebSocket`] for a broken connection or frame.
    pub async fn next(&mut self) -> Result<Event, ClientError> {
        loop {
            let Some(msg) = self.rx.next().await else {
                return Ok(Event::Closed);
            };
            let msg = match msg {
                Ok(m) => m,
                Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed) => {
                    return Ok(Event::Closed);
                }
                Err(e) => return Err(ClientError::WebSocket(e.to_string())),
            };
            match msg {
                Message::Text(t) => {
                    let control: Control = serde_json::from_str(&t).map_err(|e| {
                        ClientError::WebSocket(format!("a control frame is not valid: {e}: {t}"))
                    })?;
                    match control {
                        Control::SessionInfo(info) => {
                            self.tty = info.tty;
                            self.offset = info.offset;
                            self.screen_next = info.screen;
                            self.info = Some(info.clone());
                            return Ok(Event::Info(info));
                        }
                        Control::Gap { from, to } => {
                            self.offset = to;
                            return Ok(Event::Gap { from, to });
                        }
                        Control::Exit(status) => {
                            self.exit = Some(status.clone());
                            return Ok(Event::Exit(status));
                        }
                        _ => {}
                    }
                }
                Message::Binary(data) => {
                    if self.screen_next {
                        self.screen_next = false;
                        return Ok(Event::Screen(data.to_vec()));
                    }
                    if self.tty {
                        self.offset += data.len() as u64;
                        return Ok(Event::Output(StreamId::Stdout, data.to_vec()));
                    }
                    match data.first().copied().and_then(StreamId::from_byte) {
                        Some(s @ (StreamId::Stdout | StreamId::Stderr)) => {
                            self.offset += (data.len() - 1) as u64;
                            return Ok(Event::Output(s, data[1..].to_vec()));
                        }
                        Some(StreamId::Exit) if self.exit.is_none() => {
                            // A guest that sends only Sprites' byte.
                            let code = i32::from(data.get(1).copied().unwrap_or(255));
                            let status = ExitStatus {
                                exit_code: code,
                                ..ExitStatus::default()
                            };
                            self.exit = Some(status.clone());
                            return Ok(Event::Exit(status));
                        }
                        _ => {}
                    }
                }
                Message::Close(_) => return Ok(Event::Closed),
                _ => {}
            }
        }
    }

    /// The offset of the next output byte (for an attach after a
    /// disconnect).
    #[must_use]
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The session, as the last `session_info` said.
    #[must_use]
    pub fn info(&self) -> Option<&SessionInfo> {
        self.info.as_ref()
    }

    /// How it ended, once [`Event::Exit`] came.
    #[must_use]
    pub fn exit(&self) -> Option<&ExitStatus> {
        self.exit.as_ref()
    }
}

impl Sender {
    async fn send(&mut self, msg: Message) -> Result<(), ClientError> {
        self.tx
            .send(msg)
            .await
            .map_err(|e| ClientError::WebSocket(e.to_string()))
    }

    /// Input.
    ///
    /// # Errors
    /// [`ClientError::WebSocket`].
    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let frame = if self.tty {
            data.to_vec()
        } else {
            let mut f = Vec::with_capacity(data.len() + 1);
            f.push(StreamId::Stdin as u8);
            f.extend_from_slice(data);
            f
        };
        self.send(Message::Binary(frame.into())).await
    }

    /// The end of input (without a TTY; a TTY's is `^D` in [`Self::stdin`]).
    ///
    /// # Errors
    /// [`ClientError::WebSocket`].
    pub async fn stdin_eof(&mut self) -> Result<(), ClientError> {
        if self.tty {
            return Ok(());
        }
        self.send(Message::Binary(vec![StreamId::StdinEof as u8].into()))
            .await
    }

    async fn control(&mut self, control: &Control) -> Result<(), ClientError> {
        let text = serde_json::to_string(control).expect("a control frame serializes");
        self.send(Message::Text(text.into())).await
    }

    /// The terminal's size.
    ///
    /// # Errors
    /// [`ClientError::WebSocket`].
    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.control(&Control::Resize { cols, rows }).await
    }

    /// A signal for the session's process group.
    ///
    /// # Errors
    /// [`ClientError::WebSocket`].
    pub async fn signal(&mut self, signal: &str) -> Result<(), ClientError> {
        self.control(&Control::Signal {
            signal: signal.to_owned(),
        })
        .await
    }

    /// Detaches (the session goes on).
    ///
    /// # Errors
    /// [`ClientError::WebSocket`].
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.tx
            .close()
            .await
            .map_err(|e| ClientError::WebSocket(e.to_string()))
    }
}
