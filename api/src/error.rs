//! The error shape of every operation: `{"error": {"code", "message"}}`,
//! with a stable machine-readable `code` and a `message` for a person that
//! says what to do next.

use serde::{Deserialize, Serialize};

/// An error answer's body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable and machine-readable: `not_found`, `invalid`, `unauthorized`,
    /// `unsupported_version`, …
    pub code: String,
    /// What went wrong and what to do, for a person.
    pub message: String,
}

impl ErrorBody {
    /// An error body.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}
