//! The one error type of the operations layer. It knows nothing of HTTP; the
//! daemon maps each variant to a status code in exactly one place.

use hangar_api::MachineState;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; retrying it unchanged will fail again.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// A name is taken, or something still depends on what is being removed.
    #[error("{0}")]
    Conflict(String),
    /// The operation is not legal in the machine's current state.
    #[error("{message}")]
    WrongState { message: String, state: MachineState },
    /// A wait ran out of time.
    #[error("{0}")]
    Timeout(String),
    /// Something we depend on (an image registry) failed or answered
    /// something unusable; retrying later may work.
    #[error("{0}")]
    Upstream(String),
    /// Something we depend on (an image registry) refused our credentials.
    #[error("{0}")]
    UpstreamAuth(String),
    /// A service Hangar runs beside the daemon (the egress gateway) is
    /// not answering; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// The disk is full.
    #[error("{0}")]
    NoSpace(String),
    /// Something failed on our side; the message says what was being done.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn internal(context: &str, e: impl std::fmt::Display) -> Error {
        Error::Internal(format!("{context}: {e}"))
    }

    /// The message a caller may see. An internal error's detail (host
    /// paths, a library's message, file contents it quoted) is the
    /// operator's: it goes to the log under a fresh id, and the caller gets
    /// only the id (omicron's `InternalError` does the same).
    pub fn public_message(&self) -> String {
        match self {
            Error::Internal(detail) => {
                let id = crate::random_hex(6);
                tracing::error!(error_id = %id, "internal error: {detail}");
                format!("internal error (id {id}); the daemon's log has the detail under this id")
            }
            other => other.to_string(),
        }
    }
}

impl From<hangar_store::StoreError> for Error {
    fn from(e: hangar_store::StoreError) -> Error {
        use hangar_store::StoreError as S;
        match e {
            S::Conflict(m) => Error::Conflict(m),
            S::NotFound(m) => Error::NotFound(m),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<hangar_image::ImageError> for Error {
    fn from(e: hangar_image::ImageError) -> Error {
        Error::from(&e)
    }
}

impl From<&hangar_image::ImageError> for Error {
    fn from(e: &hangar_image::ImageError) -> Error {
        use hangar_image::ImageError as I;
        let message = e.to_string();
        match e {
            I::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                // The message names the store's files: the log has it.
                tracing::warn!("{message}: {source}");
                Error::NoSpace("no space left on the device for images; free some (hangar image prune)".into())
            }
            I::Io { source, .. } => Error::Internal(format!("{message}: {source}")),
            I::NotFound { .. } => Error::NotFound(message),
            I::Unauthorized { .. } => Error::UpstreamAuth(message),
            I::Registry { .. } => Error::Upstream(message),
            _ => Error::BadRequest(message),
        }
    }
}

impl Error {
    /// Like `From`, for errors of a pull: content that does not match its
    /// digest, or a malformed manifest, is the registry's fault, not the
    /// request's (a local layout's would be the request's).
    pub(crate) fn from_pull(e: &hangar_image::ImageError) -> Error {
        use hangar_image::ImageError as I;
        match e {
            I::DigestMismatch { .. } | I::Invalid { .. } => Error::Upstream(e.to_string()),
            other => Error::from(other),
        }
    }
}

impl From<hangar_rootfs::RootfsError> for Error {
    fn from(e: hangar_rootfs::RootfsError) -> Error {
        match e {
            hangar_rootfs::RootfsError::Invalid(m) => Error::BadRequest(m),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<hangar_runtime::RuntimeError> for Error {
    fn from(e: hangar_runtime::RuntimeError) -> Error {
        Error::Internal(e.to_string())
    }
}
