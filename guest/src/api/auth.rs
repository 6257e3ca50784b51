//! Bearer-token check: the token's SHA-256 against the configured hash, in
//! constant time, so neither the token nor the hash leaks through timing.
#![deny(clippy::disallowed_methods)]

use http::HeaderMap;
use http::header::AUTHORIZATION;

/// The configured token hash.
#[derive(Clone)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(…)")
    }
}

fn from_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Equality that takes the same time wherever the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl TokenHash {
    /// From 64 hex digits (checked by the configuration already).
    #[must_use]
    pub fn from_hex(hex: &str) -> Option<Self> {
        from_hex(hex).map(Self)
    }

    /// The hash.
    #[must_use]
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }

    /// Whether `token` hashes to the configured value.
    #[must_use]
    pub fn matches(&self, token: &str) -> bool {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut got = [0u8; 32];
        got.copy_from_slice(digest.as_ref());
        constant_time_eq(&got, &self.0)
    }

    /// Whether the request carries `Authorization: Bearer <token>` with the
    /// right token.
    #[must_use]
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .is_some_and(|token| self.matches(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    // sha256("test")
    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn bearer_token() {
        let hash = TokenHash::from_hex(HASH).unwrap();
        assert!(hash.matches("test"));
        assert!(!hash.matches("tess"));
        let mut h = HeaderMap::new();
        assert!(!hash.allows(&h));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer test"));
        assert!(hash.allows(&h));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer test"));
        assert!(hash.allows(&h));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic dGVzdA=="));
        assert!(!hash.allows(&h));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert!(!hash.allows(&h));
        assert!(TokenHash::from_hex("zz").is_none());
    }
}
