//! The API's version and how a client and a guest agree on one.
//!
//! Versions are whole numbers. A guest speaking version N serves N and
//! N−1; a client speaking N talks to guests speaking N or N−1. The client
//! sends the version it speaks in [`VERSION_HEADER`]; the guest answers in
//! the highest version both speak ([`negotiate`]) and says which in the same
//! header of its answer, or refuses with 400 `unsupported_version` when the
//! client is older than N−1. A request without the header (curl) gets the
//! guest's own version. The client checks the answer's version with
//! [`accept`].

/// The version this crate describes.
pub const API_VERSION: u32 = 1;
/// The oldest version a party speaking [`API_VERSION`] still speaks (N−1;
/// there is no version 0).
pub const OLDEST: u32 = if API_VERSION > 1 { API_VERSION - 1 } else { 1 };
/// The header that carries the version, on requests and on answers.
pub const VERSION_HEADER: &str = "nestbox-api-version";
/// The header that lists the extensions a guest serves beyond the
/// Sprites-compatible wire formats (see [`CAPABILITIES`]).
pub const CAPABILITIES_HEADER: &str = "nestbox-capabilities";
/// The extensions this version serves, as [`CAPABILITIES_HEADER`] lists
/// them: detachable exec sessions, replay from a byte offset, the whole
/// exit status.
pub const CAPABILITIES: &[&str] = &["exec-sessions", "exec-offsets", "exec-exit-status"];

/// Why two parties cannot talk.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// The header is not a version number.
    #[error("{VERSION_HEADER} must be a whole number, not {0:?}")]
    Malformed(String),
    /// The client is older than the guest serves.
    #[error(
        "this client speaks API version {client}; the VM's guest speaks {guest} and {OLDEST} at the oldest: upgrade the client"
    )]
    ClientTooOld {
        /// The client's version.
        client: u32,
        /// The guest's.
        guest: u32,
    },
    /// The guest is older than the client speaks.
    #[error(
        "the VM's guest answered in API version {guest}; this client speaks {API_VERSION} and {OLDEST} at the oldest: recreate the VM from a newer image, or use an older client"
    )]
    GuestTooOld {
        /// The guest's answer's version.
        guest: u32,
    },
}

fn parse(value: &str) -> Result<u32, VersionError> {
    value
        .trim()
        .parse()
        .map_err(|_| VersionError::Malformed(value.to_owned()))
}

/// The guest's side: the version to answer a request in, given the value of
/// its [`VERSION_HEADER`] (if any).
///
/// # Errors
/// [`VersionError`] when the header is malformed or the client too old.
pub fn negotiate(offered: Option<&str>) -> Result<u32, VersionError> {
    let Some(offered) = offered else {
        return Ok(API_VERSION);
    };
    let client = parse(offered)?;
    if client < OLDEST {
        return Err(VersionError::ClientTooOld {
            client,
            guest: API_VERSION,
        });
    }
    Ok(client.min(API_VERSION))
}

/// The client's side: whether it can read an answer in the version its
/// [`VERSION_HEADER`] names (an answer without one is version 1, the first).
///
/// # Errors
/// [`VersionError`] when the header is malformed or the guest too old.
pub fn accept(answered: Option<&str>) -> Result<u32, VersionError> {
    let guest = answered.map_or(Ok(1), parse)?;
    if guest < OLDEST || guest > API_VERSION {
        return Err(VersionError::GuestTooOld { guest });
    }
    Ok(guest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_answers_in_the_highest_common_version() {
        assert_eq!(negotiate(None), Ok(API_VERSION));
        assert_eq!(negotiate(Some("1")), Ok(1));
        assert_eq!(negotiate(Some(" 7 ")), Ok(API_VERSION), "a newer client");
        assert!(matches!(
            negotiate(Some("0")),
            Err(VersionError::ClientTooOld { .. })
        ));
        assert!(matches!(
            negotiate(Some("v1")),
            Err(VersionError::Malformed(_))
        ));
    }

    #[test]
    fn the_client_reads_n_and_n_minus_1() {
        assert_eq!(accept(Some(&API_VERSION.to_string())), Ok(API_VERSION));
        assert_eq!(accept(Some(&OLDEST.to_string())), Ok(OLDEST));
        assert_eq!(accept(None), Ok(1));
        assert!(accept(Some(&(API_VERSION + 1).to_string())).is_err());
        assert!(accept(Some("x")).is_err());
    }
}
