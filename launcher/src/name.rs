//! VM names. A name is the first label of the VM's URLs
//! (`https://NAME.DOMAIN/`, `https://PORT.NAME.DOMAIN/`) and of its
//! certificate, so it must be a DNS label; it also names the VM's directory
//! under the state directory, which a DNS label can do safely (no `/`, no
//! `..`).

use std::fmt;

/// A checked VM name: 1–63 of `a-z0-9-`, not starting or ending with `-`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmName(String);

/// A name that is not a DNS label.
#[derive(Debug, thiserror::Error)]
#[error(
    "{name:?} is not a valid VM name: {why}. A VM name is a DNS label: 1 to 63 of a-z, 0-9 \
     and '-', not starting or ending with '-' (for example `web-1`)"
)]
pub struct NameError {
    /// The refused name.
    pub name: String,
    /// What is wrong with it.
    pub why: String,
}

impl VmName {
    /// Checks `name`.
    ///
    /// # Errors
    /// [`NameError`] saying what is wrong and what a name looks like.
    pub fn new(name: &str) -> Result<Self, NameError> {
        let refuse = |why: String| NameError {
            name: name.to_owned(),
            why,
        };
        if name.is_empty() {
            return Err(refuse("it is empty".into()));
        }
        if name.len() > 63 {
            return Err(refuse(format!("it is {} characters long", name.len())));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            let hint = if c.is_ascii_uppercase() {
                " (use lowercase)"
            } else {
                ""
            };
            return Err(refuse(format!("it contains {c:?}{hint}")));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(refuse("it starts or ends with '-'".into()));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `domain` is DNS labels joined by dots (the launcher's `domain`).
#[must_use]
pub fn is_domain(domain: &str) -> bool {
    !domain.is_empty() && domain.split('.').all(|label| VmName::new(label).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_are_names() {
        for ok in ["a", "vm-1", "0", "web-1", &"x".repeat(63)] {
            assert_eq!(VmName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn other_names_are_refused_saying_why() {
        let cases = [
            ("", "empty"),
            ("-a", "starts or ends"),
            ("a-", "starts or ends"),
            ("Web", "use lowercase"),
            ("a_b", "'_'"),
            ("a.b", "'.'"),
            ("../x", "'.'"),
            ("a b", "' '"),
            (&"x".repeat(64), "64 characters"),
        ];
        for (name, why) in cases {
            let err = VmName::new(name).unwrap_err().to_string();
            assert!(err.contains(why), "{name:?}: {err}");
            assert!(err.contains("DNS label"), "{err}");
        }
    }

    #[test]
    fn domains_are_labels_joined_by_dots() {
        assert!(is_domain("nestbox.test"));
        assert!(is_domain("test"));
        for bad in ["", "a..b", ".test", "test.", "Test.x", "a_b.test"] {
            assert!(!is_domain(bad), "{bad}");
        }
    }
}
