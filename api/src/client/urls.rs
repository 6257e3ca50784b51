//! URL auth: ports' modes, login and share links, scoped tokens.

use http::Method;

use super::{Client, ClientError};
use crate::types::{
    Link, LoginRequest, PortAuth, Revoked, ScopedToken, SetPortAuth, Share, ShareRequest,
    TokenRequest, UrlAuth,
};

/// `{port}` of `/v1/ports/{port}/auth`: a port, or the primary URL.
fn segment(port: Option<u16>) -> String {
    port.map_or_else(|| "primary".to_owned(), |p| p.to_string())
}

impl Client {
    /// `GET /v1/ports/{port}/auth` (`None`: the primary URL).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn port_auth(&self, port: Option<u16>) -> Result<PortAuth, ClientError> {
        let path = format!("/v1/ports/{}/auth", segment(port));
        self.json(Method::GET, &path, None::<&()>).await
    }

    /// `PUT /v1/ports/{port}/auth` (`None`: the primary URL).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn set_port_auth(
        &self,
        port: Option<u16>,
        mode: UrlAuth,
    ) -> Result<PortAuth, ClientError> {
        let path = format!("/v1/ports/{}/auth", segment(port));
        self.json(Method::PUT, &path, Some(&SetPortAuth { mode }))
            .await
    }

    /// `POST /v1/urls/login`: a browser login link (60 s, single use).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn login_link(
        &self,
        port: Option<u16>,
        path: Option<String>,
    ) -> Result<Link, ClientError> {
        self.json(
            Method::POST,
            "/v1/urls/login",
            Some(&LoginRequest { port, path }),
        )
        .await
    }

    /// `POST /v1/urls/shares`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn share(&self, port: Option<u16>, ttl_secs: u64) -> Result<Share, ClientError> {
        self.json(
            Method::POST,
            "/v1/urls/shares",
            Some(&ShareRequest { port, ttl_secs }),
        )
        .await
    }

    /// `GET /v1/urls/shares`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn shares(&self) -> Result<Vec<Share>, ClientError> {
        self.json(Method::GET, "/v1/urls/shares", None::<&()>).await
    }

    /// `DELETE /v1/urls/shares/{id}`, or every share link for `None`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn revoke_shares(&self, id: Option<&str>) -> Result<Revoked, ClientError> {
        let path = match id {
            Some(id) => format!("/v1/urls/shares/{id}"),
            None => "/v1/urls/shares".to_owned(),
        };
        self.json(Method::DELETE, &path, None::<&()>).await
    }

    /// `POST /v1/tokens`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn scoped_token(
        &self,
        ports: Vec<u16>,
        ttl_secs: u64,
    ) -> Result<ScopedToken, ClientError> {
        self.json(
            Method::POST,
            "/v1/tokens",
            Some(&TokenRequest { ports, ttl_secs }),
        )
        .await
    }

    /// `GET /v1/tokens`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn scoped_tokens(&self) -> Result<Vec<ScopedToken>, ClientError> {
        self.json(Method::GET, "/v1/tokens", None::<&()>).await
    }

    /// `DELETE /v1/tokens/{id}`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn revoke_token(&self, id: &str) -> Result<Revoked, ClientError> {
        self.json(Method::DELETE, &format!("/v1/tokens/{id}"), None::<&()>)
            .await
    }
}
