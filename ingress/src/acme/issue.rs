//! One ACME order for one hostname.

use std::sync::Arc;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};

use super::{AcmeError, CertStore, Challenges};
use crate::config::{AcmeConfig, ChallengeKind};

/// The account from the store, or a new one (saved before use).
pub(super) async fn account(config: &AcmeConfig, store: &CertStore) -> Result<Account, AcmeError> {
    let inline_root = match &config.ca_root_pem {
        Some(pem) => {
            let pem = pem.clone();
            Some(super::off_runtime(store, move |st| st.save_ca_root(&pem)).await?)
        }
        None => None,
    };
    let builder = match inline_root.as_ref().or(config.ca_root.as_ref()) {
        Some(root) => Account::builder_with_root(root)?,
        None => Account::builder()?,
    };
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
pub(super) async fn obtain(
    account: &Account,
    host: &str,
    kind: ChallengeKind,
    challenges: &Challenges,
) -> Result<(String, String), AcmeError> {
    let identifiers = [Identifier::Dns(host.to_owned())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
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
        }
        let status = order.poll_ready(&RetryPolicy::default()).await?;
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
        let chain = order.poll_certificate(&RetryPolicy::default()).await?;
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
    let certified = crate::tls::certified_key(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        std::path::Path::new("tls-alpn-01"),
    )
    .map_err(|e| fail(&e))?;
    Ok(Arc::new(certified))
}
