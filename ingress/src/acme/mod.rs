//! Certificates from ACME (instant-acme): obtained per hostname with HTTP-01
//! or TLS-ALPN-01, kept on disk, renewed when a third of their lifetime
//! remains, and published to the TLS resolver with no dropped connection.
//!
//! When a certificate cannot be had (the CA is down, a challenge fails), the
//! last good one keeps being served and the order is retried with
//! exponential backoff and jitter; the reason is logged each time.
//!
//! Every request to the CA has a timeout (`request_timeout_ms`) and so has
//! every order (`order_timeout_ms`), so one CA that accepts connections and
//! never answers stops nothing else. Orders for different names run at once
//! (`concurrent_orders`), and at most `orders_per_hour` start in any hour:
//! a name over that budget waits for the next slot, and its plain-HTTP URL
//! says so ([`Challenges::waiting`]).
#![deny(clippy::disallowed_methods)]

mod http;
mod issue;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

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
    /// The HTTP client for the CA could not be made.
    #[error("the ACME client: {0}")]
    Client(String),
    /// The order took longer than `order_timeout_ms`.
    #[error("the ACME order for {host} took longer than {after:?}")]
    Timeout {
        /// The hostname.
        host: String,
        /// The timeout.
        after: Duration,
    },
    /// The issued certificate could not be used.
    #[error("the issued certificate for {host} is unusable: {why}")]
    Unusable {
        /// The hostname.
        host: String,
        /// Why.
        why: String,
    },
}

/// What the manager publishes for the listeners: challenge answers, and
/// the names waiting for the order budget.
#[derive(Clone, Debug, Default)]
pub struct Challenges {
    /// HTTP-01: token → key authorization (served on port 80).
    pub http01: Http01,
    /// TLS-ALPN-01: hostname → challenge certificate (served on 443 to
    /// `acme-tls/1` handshakes).
    pub alpn: Arc<ArcSwap<HashMap<String, Arc<CertifiedKey>>>>,
    /// Names with no certificate yet whose order waits for the hourly
    /// budget → when the next slot frees.
    pub waiting: Arc<ArcSwap<HashMap<String, SystemTime>>>,
}

/// The orders started in the last hour, against `orders_per_hour`.
#[derive(Debug, Default)]
struct Budget {
    started: VecDeque<tokio::time::Instant>,
}

impl Budget {
    const HOUR: Duration = Duration::from_hours(1);

    /// Takes a slot at `now`, or says when the next one frees.
    fn take(
        &mut self,
        per_hour: usize,
        now: tokio::time::Instant,
    ) -> Result<(), tokio::time::Instant> {
        while self
            .started
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Self::HOUR)
        {
            self.started.pop_front();
        }
        if self.started.len() < per_hour.max(1) {
            self.started.push_back(now);
            Ok(())
        } else {
            Err(self.started[0] + Self::HOUR)
        }
    }
}

/// Backoff after a failed order: 5 s doubling up to 1 h, with ±25 % jitter.
pub const ORDER_BACKOFF: crate::backoff::Backoff =
    crate::backoff::Backoff::new(Duration::from_secs(5), Duration::from_hours(1)).with_jitter(0.25);

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
    budget: Budget,
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
    /// An order for it is running.
    ordering: bool,
    /// It waits for the budget, until then.
    waiting: Option<tokio::time::Instant>,
}

/// What an order task hands back.
type Outcome = (String, Result<Stored, AcmeError>);

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
            budget: Budget::default(),
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

    /// The manager renews every certificate now whenever `renew` is
    /// notified (an operator's "renew", and the tests' forced renewal).
    #[must_use]
    pub fn renew_on(mut self, renew: Arc<Notify>) -> Self {
        self.renew_now = renew;
        self
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
        let mut orders: JoinSet<Outcome> = JoinSet::new();
        loop {
            self.follow_hosts().await;
            let next_wake = self.start_due(&mut account, &mut orders).await;
            self.publish_waiting();
            tokio::select! {
                () = tokio::time::sleep_until(next_wake) => {}
                () = self.renew_now.notified() => {
                    for st in self.state.values_mut() {
                        st.next_try = Some(tokio::time::Instant::now());
                    }
                }
                changed = self.hosts.changed() => if changed.is_err() { return },
                Some(done) = orders.join_next(), if !orders.is_empty() => match done {
                    Ok((host, result)) => self.finished(&host, result, &mut account).await,
                    Err(err) => tracing::error!(%err, "an ACME order task failed"),
                },
            }
        }
    }

    /// Takes in the hostnames now wanted (with their stored certificates)
    /// and forgets the others.
    async fn follow_hosts(&mut self) {
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
    }

    /// When `st` is due for an order.
    fn due(st: &HostState, now: tokio::time::Instant) -> tokio::time::Instant {
        match (&st.current, st.next_try) {
            (_, Some(retry)) => retry,
            (None, None) => now,
            (Some(stored), None) => instant_of(renew_at(stored.not_before, stored.not_after)),
        }
    }

    /// Starts the orders that are due, as far as the concurrency and the
    /// budget allow; returns when to look again.
    async fn start_due(
        &mut self,
        account: &mut Option<instant_acme::Account>,
        orders: &mut JoinSet<Outcome>,
    ) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let mut next_wake = now + Duration::from_hours(1);
        let mut due: Vec<(tokio::time::Instant, String)> = self
            .state
            .iter()
            .filter(|(_, st)| !st.ordering)
            .map(|(h, st)| (Self::due(st, now), h.clone()))
            .collect();
        // Names without a certificate first, then the most overdue.
        due.sort_by_key(|(at, host)| (self.state[host].current.is_some(), *at));
        for (at, host) in due {
            if at > now {
                next_wake = next_wake.min(at);
                continue;
            }
            if orders.len() >= self.config.concurrent_orders.max(1) {
                // An order ending wakes the loop.
                break;
            }
            if let Err(free) = self.budget.take(self.config.orders_per_hour, now) {
                tracing::warn!(%host, "ACME order budget spent for this hour; waiting");
                for st in self.state.values_mut().filter(|st| !st.ordering) {
                    if Self::due(st, now) <= now {
                        st.waiting = Some(free);
                    }
                }
                next_wake = next_wake.min(free);
                break;
            }
            if account.is_none() {
                match issue::account(&self.config, &self.store).await {
                    Ok(made) => *account = Some(made),
                    Err(err) => {
                        self.failed(&host, &err);
                        continue;
                    }
                }
            }
            let st = self.state.get_mut(&host).expect("listed above");
            st.ordering = true;
            st.waiting = None;
            orders.spawn(order(
                account.clone().expect("made above"),
                host,
                self.config.challenge,
                self.challenges.clone(),
                self.store.clone(),
                Duration::from_millis(self.config.order_timeout_ms),
            ));
        }
        next_wake
    }

    /// An order ended.
    async fn finished(
        &mut self,
        host: &str,
        result: Result<Stored, AcmeError>,
        account: &mut Option<instant_acme::Account>,
    ) {
        let Some(st) = self.state.get_mut(host) else {
            return;
        };
        st.ordering = false;
        match result {
            Ok(stored) => {
                tracing::info!(%host, not_after = ?stored.not_after, "certificate issued");
                st.current = Some(stored);
                st.failures = 0;
                st.next_try = None;
                self.publish();
            }
            Err(AcmeError::Protocol(instant_acme::Error::Api(problem)))
                if problem
                    .r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":accountDoesNotExist")) =>
            {
                // The CA forgot the account (a reset test CA, or a
                // deactivated account): register anew, then order again.
                tracing::warn!(directory = %self.config.directory, "the CA no longer knows our account; creating a new one");
                if let Err(err) = off_runtime(&self.store, CertStore::forget_account).await {
                    tracing::warn!(%err, "the old ACME account could not be removed");
                }
                *account = None;
                st.next_try = Some(tokio::time::Instant::now());
            }
            Err(err) => self.failed(host, &err),
        }
    }

    /// Backs off `host` after `err`.
    fn failed(&mut self, host: &str, err: &AcmeError) {
        let Some(st) = self.state.get_mut(host) else {
            return;
        };
        let wait = ORDER_BACKOFF.wait(st.failures);
        st.failures += 1;
        st.next_try = Some(tokio::time::Instant::now() + wait);
        tracing::warn!(%host, %err, retry_in = ?wait, "could not obtain a certificate; serving the last good one");
    }

    /// Tells the listeners which names wait for the budget (and until
    /// when).
    fn publish_waiting(&self) {
        let waiting: HashMap<String, SystemTime> = self
            .state
            .iter()
            .filter(|(_, st)| st.current.is_none())
            .filter_map(|(h, st)| {
                let at = st.waiting?;
                let left = at.saturating_duration_since(tokio::time::Instant::now());
                Some((h.clone(), SystemTime::now() + left))
            })
            .collect();
        if **self.challenges.waiting.load() != waiting {
            self.challenges.waiting.store(Arc::new(waiting));
        }
    }
}

/// One order for `host`, within `within`, stored once issued.
async fn order(
    account: instant_acme::Account,
    host: String,
    kind: ChallengeKind,
    challenges: Challenges,
    store: CertStore,
    within: Duration,
) -> Outcome {
    let obtained = tokio::time::timeout(
        within,
        issue::obtain(&account, &host, kind, &challenges, within),
    )
    .await;
    let result = match obtained {
        Err(_) => Err(AcmeError::Timeout {
            host: host.clone(),
            after: within,
        }),
        Ok(Err(err)) => Err(err),
        Ok(Ok((chain, key))) => {
            let name = host.clone();
            off_runtime(&store, move |st| st.save(&name, &chain, &key))
                .await
                .map_err(AcmeError::from)
        }
    };
    (host, result)
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
    fn the_budget_allows_so_many_orders_an_hour() {
        let mut budget = Budget::default();
        let t0 = tokio::time::Instant::now();
        for i in 0..3 {
            assert!(budget.take(3, t0 + Duration::from_secs(i)).is_ok());
        }
        let later = t0 + Duration::from_secs(10);
        assert_eq!(budget.take(3, later), Err(t0 + Budget::HOUR));
        assert!(
            budget.take(3, t0 + Budget::HOUR).is_ok(),
            "the first slot freed"
        );
        assert!(budget.take(3, t0 + Budget::HOUR).is_err());
    }
}
