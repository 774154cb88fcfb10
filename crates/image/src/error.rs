//! The one error type of this crate.

use std::io;

/// Everything that can go wrong while parsing a reference, importing an image
/// or writing a layout.
///
/// Each variant names what it is about (the reference, blob, tag or path), so
/// a message is useful on its own. [`ImageError::Io`] keeps the underlying
/// error as its `source()` and does not repeat it in its own message.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference string is not one this crate understands.
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it, and what a valid one looks like.
        reason: String,
    },

    /// The registry wants credentials we don't have, or refused the ones
    /// we sent.
    #[error("registry {registry} refused access to {repository}: {detail}")]
    Unauthorized {
        /// `host[:port]`.
        registry: String,
        /// The repository asked for.
        repository: String,
        /// What happened, and where credentials come from.
        detail: String,
    },

    /// The registry could not be reached, or answered in a way we cannot
    /// use (an HTTP error, a broken connection, a malformed answer).
    #[error("registry {registry}: {detail}")]
    Registry {
        /// `host[:port]`.
        registry: String,
        /// What went wrong.
        detail: String,
    },

    /// A configuration file (registry auth file, CA bundle) is unusable.
    #[error("invalid {what}: {reason}")]
    Config {
        /// Which file.
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A layout, archive, tag or blob does not exist.
    #[error("{what} not found: {detail}")]
    NotFound {
        /// What was looked for, e.g. `tag "v2" in oci:/srv/img`.
        what: String,
        /// Where it was looked for or what exists instead, e.g.
        /// `available tags: latest, v1`.
        detail: String,
    },

    /// A manifest, config or layer has a media type this crate cannot import.
    #[error("unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType {
        /// Which descriptor carries it.
        what: String,
        /// The media type found.
        media_type: String,
    },

    /// An image index offers no linux/amd64 image.
    #[error("{what} has no linux/amd64 image; available platforms: {available}")]
    UnsupportedPlatform {
        /// The index (by digest) that was searched.
        what: String,
        /// The platforms it does offer, comma separated.
        available: String,
    },

    /// Content does not hash to the digest that names it.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which blob or layer, e.g. `layer sha256:… (uncompressed, diff_id)`.
        what: String,
        /// The digest the descriptor or config promised.
        expected: String,
        /// The digest of the bytes actually read.
        actual: String,
    },

    /// The image (its layout, manifest or config) is not valid OCI.
    #[error("invalid image {image}: {reason}")]
    Invalid {
        /// The image reference (or layout path).
        image: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A layer is larger than the store's limits allow (see
    /// [`crate::ImageLimits`]).
    #[error("{what} is too large: {reason}")]
    TooLarge {
        /// Which layer of which image.
        what: String,
        /// Which limit it passed, and how to raise it.
        reason: String,
    },

    /// A tar entry would escape the directory it is unpacked into, or is
    /// otherwise not safe to unpack.
    #[error("unsafe path {path:?} in {what}: {reason}")]
    UnsafePath {
        /// Which tar (layer digest or archive path).
        what: String,
        /// The entry's path (or link target) as written in the tar.
        path: String,
        /// Why it was refused.
        reason: String,
    },

    /// An I/O operation failed.
    #[error("{context}")]
    Io {
        /// What was being done, with the path involved.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Attaches "what was being done" to an I/O error.
pub(crate) trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| ImageError::Io {
            context: context(),
            source,
        })
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| ImageError::Io {
            context: context(),
            source: errno.into(),
        })
    }
}
