//! Supervision of the platform's own services (port watcher, ingress, API,
//! …): each runs as a task; when it returns an error or panics it is logged
//! and started again after a backoff, while the others keep serving.
#![deny(clippy::disallowed_methods)]

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;

/// The wait before a restart: 100 ms, doubled on each failure in a row,
/// up to 30 s.
const RESTART: nestbox_ingress::backoff::Backoff =
    nestbox_ingress::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
/// A run this long resets the backoff.
const HEALTHY: Duration = Duration::from_secs(30);

/// Runs `make()`'s future as the platform service `name`, forever: a
/// return with an error or a panic restarts it after a backoff; a return
/// with `Ok` ends supervision (the service finished on purpose).
pub fn supervise<F, Fut, E>(name: &'static str, mut make: F) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let started = tokio::time::Instant::now();
            let why = match tokio::spawn(make()).await {
                Ok(Ok(())) => {
                    tracing::info!(service = name, "platform service finished");
                    return;
                }
                Ok(Err(err)) => err.to_string(),
                Err(join) if join.is_panic() => {
                    let payload = join.into_panic();
                    let text = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_owned());
                    format!("panicked: {text}")
                }
                Err(join) => format!("was cancelled: {join}"),
            };
            if started.elapsed() >= HEALTHY {
                failures = 0;
            }
            let wait = RESTART.wait(failures);
            failures = failures.saturating_add(1);
            tracing::error!(service = name, %why, restart_in = ?wait, "platform service failed; restarting it");
            tokio::time::sleep(wait).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn restarts_after_panics_and_errors_until_ok() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let handle = supervise("test", move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => panic!("injected"),
                    1 => Err("failed"),
                    _ => Ok(()),
                }
            }
        });
        handle.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }
}
