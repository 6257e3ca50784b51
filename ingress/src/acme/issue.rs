//! One ACME order for one hostname.
#![deny(clippy::disallowed_methods)]

use std::sync::Arc;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};

use super::{AcmeError, CertStore, Challenges};
use crate::config::{AcmeConfig, ChallengeKind};

/// The CA roots the client trusts: the configured root (file or inline),
/// or `None` for the platform's.
async fn roots(config: &AcmeConfig) -> Result<Option<rustls::RootCertStore>, AcmeError> {
    let pem = match (&config.ca_root_pem, &config.ca_root) {
        (Some(pem), _) => pem.clone().into_bytes(),
        (None, Some(path)) => tokio::fs::read(path)
            .await
            .map_err(|e| AcmeError::Client(format!("read the CA root {}: {e}", path.display())))?,
        (None, None) => return Ok(None),
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| AcmeError::Client(format!("the CA root: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| AcmeError::Client(format!("the CA root: {e}")))?;
    }
    if roots.is_empty() {
        return Err(AcmeError::Client("the CA root holds no certificate".into()));
    }
    Ok(Some(roots))
}

/// The account from the store, or a new one (saved before use), speaking
/// through a client whose every request has a timeout.
pub(super) async fn account(config: &AcmeConfig, store: &CertStore) -> Result<Account, AcmeError> {
    let timeout = std::time::Duration::from_millis(config.request_timeout_ms);
    let client = super::http::Timed::new(roots(config).await?, timeout)
        .map_err(|e| AcmeError::Client(e.to_string()))?;
    let builder = Account::builder_with_http(Box::new(client));
    if let Some(creds) = super::off_runtime(store, CertStore::account).await? {
        return Ok(builder.from_credentials(creds).await?);
    }
    let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
    let (account, creds) = builder
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await?;
    super::off_runtime(store, move |st| st.save_account(&creds)).await?;
    tracing::info!(directory = %config.directory, "ACME account created");
    Ok(account)
}

/// Orders a certificate for `host`, answering the challenge through
/// `challenges`. Returns (chain PEM, key PEM).
/// How an order is polled: Pebble and most CAs validate within
/// milliseconds, so the first look comes soon and the wait grows from
/// there (instant-acme's default waits 250 ms, then 500 ms, …).
fn polling(within: std::time::Duration) -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(std::time::Duration::from_millis(15))
        .backoff(1.6)
        .timeout(within)
}

pub(super) async fn obtain(
    account: &Account,
    host: &str,
    kind: ChallengeKind,
    challenges: &Challenges,
    within: std::time::Duration,
) -> Result<(String, String), AcmeError> {
    let started = std::time::Instant::now();
    let step = |what: &str| {
        tracing::debug!(%host, step = what, ms = started.elapsed().as_millis(), "ACME order");
    };
    let identifiers = [Identifier::Dns(host.to_owned())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    step("ordered");
    let mut published: Vec<String> = Vec::new();
    let result = async {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Order {
                        host: host.to_owned(),
                        status: format!("{other:?}"),
                        detail: "authorization not pending".into(),
                    });
                }
            }
            let wanted = match kind {
                ChallengeKind::Http01 => ChallengeType::Http01,
                ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            };
            let mut challenge = authz
                .challenge(wanted)
                .ok_or_else(|| AcmeError::NoChallenge {
                    host: host.to_owned(),
                    kind,
                })?;
            let key_auth = challenge.key_authorization();
            match kind {
                ChallengeKind::Http01 => {
                    let token = challenge.token.clone();
                    let value = key_auth.as_str().to_owned();
                    challenges.http01.rcu(|m| {
                        let mut m = (**m).clone();
                        m.insert(token.clone(), value.clone());
                        m
                    });
                    published.push(token);
                }
                ChallengeKind::TlsAlpn01 => {
                    let cert = alpn_certificate(host, key_auth.digest().as_ref())?;
                    challenges.alpn.rcu(|m| {
                        let mut m = (**m).clone();
                        m.insert(host.to_owned(), cert.clone());
                        m
                    });
                }
            }
            challenge.set_ready().await?;
            step("challenge ready");
        }
        let status = order.poll_ready(&polling(within)).await?;
        step("order ready");
        if status != OrderStatus::Ready {
            let detail = order
                .state()
                .error
                .as_ref()
                .map_or_else(String::new, |p| format!("{p:?}"));
            return Err(AcmeError::Order {
                host: host.to_owned(),
                status: format!("{status:?}"),
                detail,
            });
        }
        let key_pem = order.finalize().await?;
        step("finalized");
        let chain = order.poll_certificate(&polling(within)).await?;
        step("certificate");
        Ok((chain, key_pem))
    }
    .await;
    // Withdraw the answers whatever happened.
    challenges.http01.rcu(|m| {
        let mut m = (**m).clone();
        for t in &published {
            m.remove(t);
        }
        m
    });
    if kind == ChallengeKind::TlsAlpn01 {
        challenges.alpn.rcu(|m| {
            let mut m = (**m).clone();
            m.remove(host);
            m
        });
    }
    result
}

/// The self-signed TLS-ALPN-01 certificate (RFC 8737): the hostname as its
/// only SAN and the key authorization's SHA-256 in a critical
/// `acmeIdentifier` extension.
fn alpn_certificate(
    host: &str,
    digest: &[u8],
) -> Result<Arc<rustls::sign::CertifiedKey>, AcmeError> {
    let fail = |e: &dyn std::fmt::Display| AcmeError::AlpnCert(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(|e| fail(&e))?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_owned()]).map_err(|e| fail(&e))?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let cert = params.self_signed(&key).map_err(|e| fail(&e))?;
    let certified = crate::tls::certified_key_unchecked(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        std::path::Path::new("tls-alpn-01"),
    )
    .map_err(|e| fail(&e))?;
    Ok(Arc::new(certified))
}
