//! Certificates from ACME (instant-acme): obtained per hostname with HTTP-01
//! or TLS-ALPN-01, kept on disk, renewed when a third of their lifetime
//! remains, and published to the TLS resolver with no dropped connection.
//!
//! When a certificate cannot be had (the CA is down, a challenge fails), the
//! last good one keeps being served and the order is retried with
//! exponential backoff and jitter; the reason is logged each time.

mod issue;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use tokio::sync::{Notify, watch};

use crate::config::{AcmeConfig, ChallengeKind};
use crate::server::Http01;
use crate::tls::CertSet;
pub use store::{CertStore, StoreError, Stored};

/// Errors of the ACME client.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME server or protocol failed.
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    /// The on-disk store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The order did not become ready.
    #[error("ACME order for {host} ended {status}: {detail}")]
    Order {
        /// The hostname.
        host: String,
        /// The final status.
        status: String,
        /// The server's problem detail, when given.
        detail: String,
    },
    /// The CA offered no challenge of the configured kind.
    #[error("the CA offered no {kind:?} challenge for {host}")]
    NoChallenge {
        /// The hostname.
        host: String,
        /// The kind wanted.
        kind: ChallengeKind,
    },
    /// The TLS-ALPN-01 certificate could not be made.
    #[error("cannot make the TLS-ALPN-01 certificate: {0}")]
    AlpnCert(String),
    /// The issued certificate could not be used.
    #[error("the issued certificate for {host} is unusable: {why}")]
    Unusable {
        /// The hostname.
        host: String,
        /// Why.
        why: String,
    },
}

/// Where challenge answers are published for the listeners.
#[derive(Clone, Debug, Default)]
pub struct Challenges {
    /// HTTP-01: token → key authorization (served on port 80).
    pub http01: Http01,
    /// TLS-ALPN-01: hostname → challenge certificate (served on 443 to
    /// `acme-tls/1` handshakes).
    pub alpn: Arc<ArcSwap<HashMap<String, Arc<CertifiedKey>>>>,
}

/// Backoff after a failed order: 5 s doubling up to 1 h, with ±25 % jitter.
#[must_use]
pub fn backoff(failures: u32) -> Duration {
    let base = 5u64.saturating_mul(1u64 << failures.min(10)).min(3600);
    let jitter = rand::random_range(0.75..1.25);
    // base <= 3600: exact in f64.
    Duration::from_secs_f64(f64::from(u32::try_from(base).unwrap_or(3600)) * jitter)
}

/// When a certificate valid from `not_before` to `not_after` is due for
/// renewal: when a third of its lifetime remains.
#[must_use]
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_after - lifetime / 3
}

/// The certificate manager. Run it with [`Manager::run`].
pub struct Manager {
    config: AcmeConfig,
    store: CertStore,
    hosts: watch::Receiver<Vec<String>>,
    certs: watch::Sender<Arc<CertSet>>,
    challenges: Challenges,
    renew_now: Arc<Notify>,
    state: HashMap<String, HostState>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("directory", &self.config.directory)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct HostState {
    current: Option<Stored>,
    failures: u32,
    next_try: Option<tokio::time::Instant>,
}

impl Manager {
    /// A manager for the hostnames published on `hosts`, serving what it has
    /// through `certs`. Certificates already in the store are published at
    /// once.
    ///
    /// # Errors
    /// [`AcmeError::Store`] if the state directory is unusable.
    pub fn new(
        config: AcmeConfig,
        hosts: watch::Receiver<Vec<String>>,
        certs: watch::Sender<Arc<CertSet>>,
        challenges: Challenges,
    ) -> Result<Self, AcmeError> {
        let store = CertStore::open(&config.state_dir)?;
        let mut manager = Self {
            config,
            store,
            hosts,
            certs,
            challenges,
            renew_now: Arc::new(Notify::new()),
            state: HashMap::new(),
        };
        let hosts = manager.hosts.borrow().clone();
        for host in hosts {
            let current = match manager.store.load(&host) {
                Ok(found) => found,
                Err(err) => {
                    tracing::warn!(%host, %err, "stored certificate unusable; a new one will be ordered");
                    None
                }
            };
            manager.state.insert(
                host,
                HostState {
                    current,
                    ..HostState::default()
                },
            );
        }
        manager.publish();
        Ok(manager)
    }

    /// A handle that makes the manager renew every certificate now (an
    /// operator's "renew", and the tests' forced renewal).
    #[must_use]
    pub fn renew_handle(&self) -> Arc<Notify> {
        self.renew_now.clone()
    }

    fn publish(&self) {
        let mut set = CertSet::default();
        for (host, st) in &self.state {
            if let Some(stored) = &st.current {
                set.insert(std::slice::from_ref(host), &stored.key);
            }
        }
        self.certs.send_replace(Arc::new(set));
    }

    /// Keeps every hostname's certificate valid, forever.
    pub async fn run(mut self) {
        let mut account = None;
        loop {
            let hosts = self.hosts.borrow_and_update().clone();
            self.state.retain(|h, _| hosts.contains(h));
            for host in &hosts {
                if !self.state.contains_key(host) {
                    let name = host.clone();
                    let current = off_runtime(&self.store, move |st| st.load(&name))
                        .await
                        .ok()
                        .flatten();
                    self.state.insert(
                        host.clone(),
                        HostState {
                            current,
                            ..HostState::default()
                        },
                    );
                    self.publish();
                }
            }
            let now = tokio::time::Instant::now();
            let mut next_wake = now + Duration::from_hours(1);
            for host in &hosts {
                let st = &self.state[host];
                let due = match (&st.current, st.next_try) {
                    (_, Some(retry)) => retry,
                    (None, None) => now,
                    (Some(stored), None) => {
                        instant_of(renew_at(stored.not_before, stored.not_after))
                    }
                };
                if due > now {
                    next_wake = next_wake.min(due);
                    continue;
                }
                let result = self.order(&mut account, host).await;
                let st = self.state.get_mut(host).expect("host present");
                match result {
                    Ok(stored) => {
                        tracing::info!(%host, not_after = ?stored.not_after, "certificate issued");
                        st.current = Some(stored);
                        st.failures = 0;
                        st.next_try = None;
                        self.publish();
                    }
                    Err(err) => {
                        let wait = backoff(st.failures);
                        st.failures += 1;
                        st.next_try = Some(tokio::time::Instant::now() + wait);
                        tracing::warn!(%host, %err, retry_in = ?wait, "could not obtain a certificate; serving the last good one");
                        next_wake = next_wake.min(tokio::time::Instant::now() + wait);
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(next_wake) => {}
                () = self.renew_now.notified() => {
                    for st in self.state.values_mut() {
                        st.next_try = Some(tokio::time::Instant::now());
                    }
                }
                changed = self.hosts.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn order(
        &mut self,
        account: &mut Option<instant_acme::Account>,
        host: &str,
    ) -> Result<Stored, AcmeError> {
        if account.is_none() {
            *account = Some(issue::account(&self.config, &self.store).await?);
        }
        let acct = account.as_ref().expect("just set");
        let obtained = issue::obtain(acct, host, self.config.challenge, &self.challenges).await;
        let (chain, key) = match obtained {
            Err(AcmeError::Protocol(instant_acme::Error::Api(problem)))
                if problem
                    .r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":accountDoesNotExist")) =>
            {
                // The CA forgot the account (a reset test CA, or a
                // deactivated account): register anew, then order again.
                tracing::warn!(directory = %self.config.directory, "the CA no longer knows our account; creating a new one");
                off_runtime(&self.store, CertStore::forget_account).await?;
                *account = Some(issue::account(&self.config, &self.store).await?);
                let acct = account.as_ref().expect("just set");
                issue::obtain(acct, host, self.config.challenge, &self.challenges).await?
            }
            other => other?,
        };
        let name = host.to_owned();
        Ok(off_runtime(&self.store, move |st| st.save(&name, &chain, &key)).await?)
    }
}

/// Runs a store operation (file I/O with fsync) off the runtime's workers.
pub(crate) async fn off_runtime<T, F>(store: &CertStore, op: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&CertStore) -> Result<T, StoreError> + Send + 'static,
{
    let store = store.clone();
    tokio::task::spawn_blocking(move || op(&store))
        .await
        .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())))
}

/// A tokio instant for a wall-clock time (now if it has passed).
fn instant_of(at: SystemTime) -> tokio::time::Instant {
    let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now() + wait
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_with_a_third_left() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_hours(90 * 24);
        assert_eq!(renew_at(start, end), start + Duration::from_hours(60 * 24));
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        for failures in 0..20 {
            let d = backoff(failures).as_secs_f64();
            let base = (5.0 * 2f64.powi(i32::try_from(failures.min(10)).unwrap())).min(3600.0);
            assert!(d >= base * 0.75 && d <= base * 1.25, "{failures}: {d}");
        }
    }
}
