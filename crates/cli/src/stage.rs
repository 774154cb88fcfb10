//! Local images for a daemon that may read only its import directory.
//!
//! The daemon refuses to read host files an API caller names outside its
//! import directory. The CLI, run by someone who can read both the image
//! and the daemon's data dir, copies the image there first, so that
//! `hangar machine run oci:./layout` keeps working on the daemon's host.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hangar_image::ImageRef;
use sha2::{Digest, Sha256};

/// `reference` as the daemon can read it: a local layout or archive outside
/// `import_dir` is copied into it (under a name made from its path, so a
/// second run reuses, and only adds the blobs it lacks). Anything else, or
/// with no import directory known (a remote daemon), is returned as it is.
pub fn stage(reference: &str, import_dir: Option<&Path>) -> Result<String> {
    let Some(import_dir) = import_dir else {
        return Ok(reference.to_owned());
    };
    let Ok(r) = reference.parse::<ImageRef>() else {
        return Ok(reference.to_owned()); // the daemon explains
    };
    let (scheme, path, tag) = match &r {
        ImageRef::Oci { path, tag } => ("oci", path, tag),
        ImageRef::OciArchive { path, tag } => ("oci-archive", path, tag),
        ImageRef::Registry(_) => return Ok(reference.to_owned()),
    };
    let Ok(source) = fs::canonicalize(path) else {
        return Ok(reference.to_owned());
    };
    let import_dir = fs::canonicalize(import_dir).unwrap_or_else(|_| import_dir.to_owned());
    if source.starts_with(&import_dir) {
        return Ok(reference.to_owned());
    }
    let name = hex::encode(&Sha256::digest(source.as_os_str().as_encoded_bytes())[..8]);
    let dest = import_dir.join(format!("cli-{name}"));
    if source.is_dir() {
        copy_layout(&source, &dest)?;
    } else {
        copy_file(&source, &dest)?;
    }
    let tag = tag.as_deref().map(|t| format!(":{t}")).unwrap_or_default();
    Ok(format!("{scheme}:{}{tag}", dest.display()))
}

/// Copies an OCI layout, skipping blobs already there (a blob's name is
/// its digest, so one of the same name and length is the same blob).
fn copy_layout(src: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let (from, to) = (entry.path(), dest.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_layout(&from, &to)?;
        } else if kind.is_file() {
            let same_blob = to.components().any(|c| c.as_os_str() == "blobs")
                && fs::metadata(&to).is_ok_and(|m| m.len() == entry.metadata().map(|m| m.len()).unwrap_or(u64::MAX));
            if !same_blob {
                copy_file(&from, &to)?;
            }
        } // A layout has no links or devices; anything else is not copied.
    }
    Ok(())
}

/// Copies a file in whole or not at all.
fn copy_file(src: &Path, dest: &Path) -> Result<()> {
    let mut tmp = PathBuf::from(dest);
    tmp.set_extension("hangar-tmp");
    fs::copy(src, &tmp).with_context(|| format!("copying {} into the import directory", src.display()))?;
    fs::rename(&tmp, dest).with_context(|| format!("copying {} into the import directory", src.display()))
}
