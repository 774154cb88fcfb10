//! Hangar's local image store.
//!
//! Imports OCI images from local layouts (`oci:/path[:tag]`) and archives
//! (`oci-archive:/file.tar[:tag]`) into a content-addressed blob store, and
//! unpacks each layer once into a directory that overlayfs can use as a lower
//! layer (whiteouts converted to overlayfs' form). Layer tars are untrusted:
//! nothing in one can write outside its layer directory.
//!
//! Also pulls images from registries over the OCI distribution API
//! ([`ImageStore::pull`], async); everything else is blocking, and async
//! callers run it on a blocking thread.
//! Importing needs root (owners, device nodes, `trusted.*` xattrs).

mod error;
mod gc;
mod oci;
mod pull;
mod push;
mod reference;
pub mod registry;
mod store;
mod unpack;
mod writer;

pub use error::{ImageError, Result};
pub use gc::GcReport;
pub use pull::{LayerProgress, LayerStatus, ProgressSink, PullProgress};
pub use reference::{ImageRef, RegistryRef};
pub use registry::{RegistryClient, RegistryConfig, install_crypto_provider};
pub use store::{Image, ImageConfig, ImageLimits, ImageStore, Layer};
pub use writer::{BaseLayer, LayerSource, write_derived_layout, write_oci_layout};
