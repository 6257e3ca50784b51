//! `GET /v1/services/{name}/logs?last=N&since=MS&follow=true`: a service's
//! log lines as NDJSON; with `follow`, the stream stays open with new lines.
#![deny(clippy::disallowed_methods)]

use http::{Response, StatusCode};
use tokio::sync::broadcast::error::RecvError;

use super::body::{self, Body};
use super::{ApiError, Parts};

#[derive(Debug, Default, PartialEq, Eq)]
struct Query {
    last: Option<usize>,
    since: Option<u64>,
    follow: bool,
}

fn parse_query(query: Option<&str>) -> Result<Query, ApiError> {
    let mut q = Query::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|s| !s.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "last" => {
                q.last = Some(value.parse().map_err(|_| {
                    ApiError::invalid(format!("`last` must be a count of lines, not \"{value}\""))
                })?);
            }
            "since" => {
                q.since = Some(value.parse().map_err(|_| {
                    ApiError::invalid(format!(
                        "`since` must be Unix milliseconds, not \"{value}\""
                    ))
                })?);
            }
            "follow" => q.follow = matches!(value, "" | "1" | "true"),
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown parameter `{other}` (use last, since, follow)"
                )));
            }
        }
    }
    Ok(q)
}

pub(super) async fn get(
    p: &Parts,
    name: &str,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let q = parse_query(query)?;
    if p.services.get(name).is_none() {
        return Err(ApiError::not_found(format!(
            "no service named \"{name}\" (GET /v1/services lists them)"
        )));
    }
    // Subscribe before reading the history so that no line falls between.
    let mut live = q.follow.then(|| p.logs.follow(name));
    let (logs, service) = (p.logs.clone(), name.to_owned());
    let history = tokio::task::spawn_blocking(move || logs.query(&service, q.last, q.since))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("cannot read the logs: {e}")))?;
    let (tx, mut resp) = body::ndjson_stream();
    *resp.status_mut() = StatusCode::OK;
    tokio::spawn(async move {
        let last_seen = history.last().map(|l| (l.ts_ms, l.line.clone()));
        for line in &history {
            if tx.send(body::ndjson_line(line)).await.is_err() {
                return;
            }
        }
        let Some(live) = live.as_mut() else { return };
        let mut caught_up = last_seen.is_none();
        loop {
            let entry = match live.recv().await {
                Ok(entry) => entry,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            if !caught_up {
                // Lines already sent from the history arrive here too: skip
                // up to the last one sent.
                let (ts, text) = last_seen.as_ref().expect("set when not caught up");
                if entry.ts_ms < *ts {
                    continue;
                }
                caught_up = entry.ts_ms > *ts || &entry.line == text;
                if entry.ts_ms == *ts && &entry.line == text {
                    continue;
                }
            }
            if tx.send(body::ndjson_line(&entry)).await.is_err() {
                return;
            }
        }
    });
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        assert_eq!(parse_query(None).unwrap(), Query::default());
        assert_eq!(
            parse_query(Some("last=5&since=100&follow=true")).unwrap(),
            Query {
                last: Some(5),
                since: Some(100),
                follow: true
            }
        );
        assert_eq!(parse_query(Some("last=x")).unwrap_err().code, "invalid");
        assert_eq!(parse_query(Some("tail=1")).unwrap_err().code, "invalid");
    }
}
