//! Machine root filesystems.
//!
//! Each machine's writable layer lives in its own subvolume of a storage
//! [`pool`], so that checkpoints and forks are O(1) snapshots below the
//! overlay rather than copies. The [`overlay`] module mounts that layer over
//! the image's read-only layers. [`confined`] writes files into a mounted root
//! without ever following a symlink out of it. [`private`] keeps the host's
//! other users out of all of it.

pub mod confined;
pub mod diff;
pub mod overlay;
pub mod pool;
pub mod private;
pub mod scratch;

pub use pool::{BtrfsPool, Pool};

/// Errors from root filesystem operations. Each says what was being done to
/// which path.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, RootfsError>;

pub(crate) fn io_err<E: Into<std::io::Error>>(context: impl Into<String>) -> impl FnOnce(E) -> RootfsError {
    let context = context.into();
    move |e| RootfsError::Io {
        context,
        source: e.into(),
    }
}
