//! A TCP tunnel from the client's side: [`Client::proxy`] opens one to a
//! port in the container, [`Tunnel::pipe`] joins it to a local stream (a
//! socket accepted by `nestbox proxy`, or stdin/stdout for `-W`).

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use super::{Client, ClientError, Ws};
use crate::proxy::{ProxyInit, ProxyStatus};

/// The largest frame sent (Sprites' is 32 KiB).
const FRAME: usize = 32 << 10;

/// A connected tunnel.
pub struct Tunnel {
    ws: Ws,
    /// The address the guest dialed, as the container sees it.
    pub target: String,
}

impl Client {
    /// Opens a tunnel to `host:port` inside the container.
    ///
    /// # Errors
    /// [`ClientError`]: the guest's refusal or its dial's failure.
    pub async fn proxy(&self, host: &str, port: u16) -> Result<Tunnel, ClientError> {
        let mut ws = self.upgrade("/v1/proxy").await?;
        let init = serde_json::to_string(&ProxyInit {
            host: host.to_owned(),
            port,
        })
        .expect("serializes");
        ws.send(Message::Text(init.into()))
            .await
            .map_err(|e| ClientError::WebSocket(e.to_string()))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let status: ProxyStatus = serde_json::from_str(&t).map_err(|e| {
                        ClientError::WebSocket(format!("the tunnel's answer is not valid: {e}"))
                    })?;
                    if status.status == "connected" {
                        return Ok(Tunnel {
                            ws,
                            target: status.target.unwrap_or_default(),
                        });
                    }
                    return Err(ClientError::WebSocket(
                        status
                            .error
                            .unwrap_or_else(|| format!("the tunnel said {t}")),
                    ));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::WebSocket(frame.map_or_else(
                        || "the guest closed the tunnel".to_owned(),
                        |f| f.reason.to_string(),
                    )));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(ClientError::WebSocket(e.to_string())),
                None => return Err(ClientError::WebSocket("the guest closed the tunnel".into())),
            }
        }
    }
}

impl Tunnel {
    /// Copies bytes both ways between the tunnel and `reader`/`writer`
    /// until either side ends; answers the bytes sent and received.
    ///
    /// # Errors
    /// A local I/O error.
    pub async fn pipe<R, W>(self, mut reader: R, mut writer: W) -> std::io::Result<(u64, u64)>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (mut tx, mut rx) = self.ws.split();
        let (mut sent, mut received) = (0u64, 0u64);
        let up = async {
            let mut buf = vec![0; FRAME];
            loop {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                sent += n as u64;
                if tx
                    .send(Message::Binary(buf[..n].to_vec().into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = tx.send(Message::Close(None)).await;
            Ok::<_, std::io::Error>(())
        };
        let down = async {
            while let Some(Ok(msg)) = rx.next().await {
                match msg {
                    Message::Binary(data) => {
                        writer.write_all(&data).await?;
                        writer.flush().await?;
                        received += data.len() as u64;
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            writer.shutdown().await?;
            Ok::<_, std::io::Error>(())
        };
        tokio::select! {
            r = up => r?,
            r = down => r?,
        }
        Ok((sent, received))
    }
}
