//! The HTTP client the ACME account speaks through: instant-acme's own
//! (hyper, rustls with ring), with a timeout on each request. instant-acme's
//! default client has none, so one CA that accepts a connection and never
//! answers would hold its order, and with it every renewal, for ever.
//!
//! A request that times out also drops the client's pooled connections (a
//! new client takes over): over HTTP/2 every order shares one connection,
//! and a stalled one would otherwise be reused by every later request.
#![deny(clippy::disallowed_methods)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};

type Inner = Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

/// A client whose requests each end within `timeout`.
pub struct Timed {
    current: Arc<ArcSwap<Inner>>,
    make: Arc<dyn Fn() -> Inner + Send + Sync>,
    timeout: Duration,
}

impl Timed {
    /// Trusting `roots`, or the platform's roots when `None`.
    ///
    /// # Errors
    /// The platform's roots cannot be loaded.
    pub fn new(roots: Option<rustls::RootCertStore>, timeout: Duration) -> std::io::Result<Self> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match roots {
            Some(roots) => builder.with_tls_config(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ),
            None => builder
                .try_with_platform_verifier()
                .map_err(std::io::Error::other)?,
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        // An ACME request is a small POST written in two pieces (head,
        // then the JWS body): with Nagle's algorithm the second waits for
        // the CA's delayed ACK, 40 ms per request on Linux.
        http.set_nodelay(true);
        let connector = builder
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let make = move || Client::builder(TokioExecutor::new()).build(connector.clone());
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(make())),
            make: Arc::new(make),
            timeout,
        })
    }
}

impl HttpClient for Timed {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let (uri, timeout) = (req.uri().clone(), self.timeout);
        let client = self.current.load_full();
        let sent = HttpClient::request(&*client, req);
        let (current, make) = (self.current.clone(), self.make.clone());
        Box::pin(async move {
            if let Ok(answer) = tokio::time::timeout(timeout, sent).await {
                return answer;
            }
            // Unless another request replaced it already.
            let fresh = Arc::new(make());
            current.compare_and_swap(&client, fresh);
            Err(instant_acme::Error::Other(
                format!("the CA did not answer {uri} within {timeout:?}").into(),
            ))
        })
    }
}
