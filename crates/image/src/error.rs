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

    /// The reference names a registry image; only local layouts can be
    /// imported for now.
    #[error(
        "cannot import {reference:?}: pulling from registries is not supported yet (issue 3); \
         use oci:/path/to/layout[:tag] or oci-archive:/path/to/file.tar[:tag]"
    )]
    RegistryUnsupported {
        /// The registry reference as given.
        reference: String,
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

    /// The layout's structure or JSON is not valid OCI.
    #[error("invalid OCI layout {layout}: {reason}")]
    InvalidLayout {
        /// The layout (reference or path).
        layout: String,
        /// What is wrong with it.
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
