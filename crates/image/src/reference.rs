//! Image references, spelled the way skopeo names local images.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::ImageError;

const FORMS: &str = "[registry/]repository[:tag][@sha256:digest], oci:/abs/path/to/layout[:tag] \
     or oci-archive:/abs/path/to/file.tar[:tag]";

/// Skopeo transports that name local storage we cannot read; refusing them
/// by name gives a better message than "not a valid registry reference".
const OTHER_TRANSPORTS: &[&str] = &[
    "dir",
    "docker-archive",
    "docker-daemon",
    "containers-storage",
    "ostree",
    "sif",
    "tarball",
];

/// Where an image comes from.
///
/// Parsed with [`FromStr`]; [`Display`](fmt::Display) gives back the same
/// spelling, so a parsed reference round-trips.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageRef {
    /// `oci:/path/to/layout[:tag]`: an OCI image layout directory.
    Oci {
        /// Absolute path of the layout directory (the one holding `index.json`).
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` to pick; `None` means the
        /// layout must hold exactly one image.
        tag: Option<String>,
    },
    /// `oci-archive:/path/to/file.tar[:tag]`: an OCI image layout in a tar file.
    OciArchive {
        /// Absolute path of the tar file.
        path: PathBuf,
        /// As for [`ImageRef::Oci`].
        tag: Option<String>,
    },
    /// An image in a registry (`busybox:latest`, `docker.io/x/y@sha256:…`,
    /// `docker://…`), normalized.
    Registry(RegistryRef),
}

impl ImageRef {
    /// The tag this reference selects, if any.
    pub fn tag(&self) -> Option<&str> {
        match self {
            ImageRef::Oci { tag, .. } | ImageRef::OciArchive { tag, .. } => tag.as_deref(),
            ImageRef::Registry(_) => None,
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (transport, path, tag) = match self {
            ImageRef::Oci { path, tag } => ("oci", path, tag),
            ImageRef::OciArchive { path, tag } => ("oci-archive", path, tag),
            ImageRef::Registry(r) => return r.fmt(f),
        };
        write!(f, "{transport}:{}", path.display())?;
        if let Some(tag) = tag {
            write!(f, ":{tag}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, ImageError> {
        let bad = |reason: String| ImageError::BadReference {
            reference: s.to_owned(),
            reason,
        };
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (path, tag) = parse_local(rest, "oci-archive", "file.tar").map_err(bad)?;
            return Ok(ImageRef::OciArchive { path, tag });
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (path, tag) = parse_local(rest, "oci", "layout").map_err(bad)?;
            return Ok(ImageRef::Oci { path, tag });
        }
        if s.starts_with('/') {
            return Err(bad(format!(
                "a bare path is not a reference; use oci:{s} for a layout directory \
                 or oci-archive:{s} for a tar file"
            )));
        }
        let registry = s.strip_prefix("docker://").unwrap_or(s);
        if let Some((transport, _)) = s.split_once(':')
            && OTHER_TRANSPORTS.contains(&transport)
        {
            return Err(bad(format!("the {transport}: transport is not supported; use {FORMS}")));
        }
        let r = parse_registry_ref(registry).map_err(|e| bad(format!("{e}; expected {FORMS}")))?;
        Ok(ImageRef::Registry(r))
    }
}

/// Splits `/path[:tag]` the way skopeo does: at the first `:`, so the path
/// itself cannot contain one.
fn parse_local(rest: &str, transport: &str, what: &str) -> Result<(PathBuf, Option<String>), String> {
    let (path, tag) = match rest.split_once(':') {
        Some((path, tag)) => (path, Some(tag)),
        None => (rest, None),
    };
    let example = format!("{transport}:/abs/path/to/{what}[:tag]");
    if path.is_empty() {
        return Err(format!("missing path; expected {example}"));
    }
    if !path.starts_with('/') {
        return Err(format!("path {path:?} is not absolute; expected {example}"));
    }
    let tag = match tag {
        None => None,
        Some(tag) => {
            check_tag(tag).map_err(|e| format!("{e}; expected {example}"))?;
            Some(tag.to_owned())
        }
    };
    Ok((PathBuf::from(path), tag))
}

/// Checks a layout tag (`org.opencontainers.image.ref.name`). Like skopeo we
/// accept full references (`busybox:latest`) as tags, hence `:`, `/` and `@`.
pub(crate) fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("empty tag after ':'".into());
    }
    if tag.len() > 255 {
        return Err(format!("tag is {} bytes long, at most 255 allowed", tag.len()));
    }
    let mut chars = tag.chars();
    let first = chars.next().unwrap_or('_');
    if !(first.is_ascii_alphanumeric() || first == '_') {
        return Err(format!("tag {tag:?} must start with a letter, digit or '_'"));
    }
    if let Some(c) = chars.find(|&c| !(c.is_ascii_alphanumeric() || "._-:/@+".contains(c))) {
        return Err(format!(
            "tag {tag:?} contains {c:?}; allowed are letters, digits and . _ - : / @ +"
        ));
    }
    Ok(())
}

/// A registry image, normalized the way docker and podman do:
/// `busybox` is `docker.io/library/busybox:latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryRef {
    /// `host[:port]`; Docker Hub is `docker.io`.
    pub registry: String,
    /// `library/busybox`, `owner/repo`, …
    pub repository: String,
    /// The tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// `sha256:<hex>`, when the reference pins one.
    pub digest: Option<String>,
}

impl RegistryRef {
    /// The `host[:port]` that serves the registry API (Docker Hub's lives on
    /// another name than its references use).
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// What the manifest is fetched by: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Parses the docker reference grammar
/// (`[domain[:port]/]name[:tag][@sha256:hex]`) and normalizes it.
fn parse_registry_ref(r: &str) -> Result<RegistryRef, String> {
    if r.is_empty() {
        return Err("empty reference".into());
    }
    if let Some(c) = r.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("contains {c:?}"));
    }
    let (name_tag, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest
        && crate::oci::sha256_hex(d).is_none()
    {
        return Err(format!("digest {d:?} is not of the form sha256:<64 lowercase hex>"));
    }
    // A tag is a ':' after the last '/'; an earlier ':' is a registry port.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let ok = !tag.is_empty()
            && tag.len() <= 128
            && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && tag.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return Err(format!("{tag:?} is not a valid tag"));
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let first = components[0];
    let registry = if components.len() > 1 && (first.contains('.') || first.contains(':') || first == "localhost") {
        let (host, port) = match first.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (first, None),
        };
        if host.is_empty()
            || !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            || port.is_some_and(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()))
        {
            return Err(format!("{first:?} is not a valid registry host"));
        }
        components.remove(0);
        match first {
            "index.docker.io" | "registry-1.docker.io" => "docker.io",
            other => other,
        }
    } else {
        "docker.io"
    };
    for c in &components {
        let ok = !c.is_empty()
            && c.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && c.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && c.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if !ok {
            return Err(format!(
                "{c:?} is not a valid repository name component (lowercase letters, digits, . _ -)"
            ));
        }
    }
    let mut repository = components.join("/");
    if registry == "docker.io" && components.len() == 1 {
        repository = format!("library/{repository}");
    }
    Ok(RegistryRef {
        registry: registry.to_owned(),
        repository,
        tag: match (tag, digest) {
            (None, None) => Some("latest".to_owned()),
            (tag, _) => tag.map(str::to_owned),
        },
        digest: digest.map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ImageRef, ImageError> {
        s.parse()
    }

    fn bad_reason(s: &str) -> String {
        match parse(s) {
            Err(ImageError::BadReference { reference, reason }) => {
                assert_eq!(reference, s);
                reason
            }
            other => panic!("{s:?}: expected BadReference, got {other:?}"),
        }
    }

    #[test]
    fn oci_layouts() {
        assert_eq!(
            parse("oci:/var/lib/img").unwrap(),
            ImageRef::Oci {
                path: "/var/lib/img".into(),
                tag: None
            }
        );
        assert_eq!(
            parse("oci:/var/lib/img:latest").unwrap(),
            ImageRef::Oci {
                path: "/var/lib/img".into(),
                tag: Some("latest".into())
            }
        );
        // Like skopeo: split at the first ':', the rest is the tag.
        assert_eq!(
            parse("oci:/x:docker.io/library/busybox:1.36").unwrap(),
            ImageRef::Oci {
                path: "/x".into(),
                tag: Some("docker.io/library/busybox:1.36".into())
            }
        );
    }

    #[test]
    fn oci_archives() {
        assert_eq!(
            parse("oci-archive:/tmp/a.tar").unwrap(),
            ImageRef::OciArchive {
                path: "/tmp/a.tar".into(),
                tag: None
            }
        );
        assert_eq!(
            parse("oci-archive:/tmp/a.tar:v1.2").unwrap(),
            ImageRef::OciArchive {
                path: "/tmp/a.tar".into(),
                tag: Some("v1.2".into())
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "oci:/a/b",
            "oci:/a/b:t",
            "oci-archive:/a.tar",
            "oci-archive:/a.tar:x_y-z.1",
            "docker.io/library/busybox:latest",
            "127.0.0.1:5000/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn registry_references_are_normalized() {
        let pin = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for (s, normal) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("docker://busybox:latest", "docker.io/library/busybox:latest"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("index.docker.io/x/y", "docker.io/x/y:latest"),
            (&format!("docker.io/x/y@{pin}"), &format!("docker.io/x/y@{pin}")),
            (&format!("docker.io/x/y:1.0@{pin}"), &format!("docker.io/x/y:1.0@{pin}")),
            ("localhost:5000/foo/bar:dev", "localhost:5000/foo/bar:dev"),
            ("ghcr.io/owner/repo-name_x:v1", "ghcr.io/owner/repo-name_x:v1"),
            ("docker://quay.io/a/b", "quay.io/a/b:latest"),
        ] {
            assert_eq!(parse(s).unwrap().to_string(), normal, "{s}");
        }
        let ImageRef::Registry(r) = parse("127.0.0.1:5000/a/b:t").unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.api_host()),
            ("127.0.0.1:5000", "a/b", "127.0.0.1:5000")
        );
        assert_eq!(r.manifest_reference(), "t");
        let ImageRef::Registry(r) = parse(&format!("x:t@{pin}")).unwrap() else {
            panic!()
        };
        assert_eq!((r.api_host(), r.manifest_reference()), ("registry-1.docker.io", pin));
    }

    #[test]
    fn relative_paths_are_rejected() {
        let r = bad_reason("oci:relative/dir:tag");
        assert!(r.contains("not absolute"), "{r}");
        assert!(r.contains("oci:/abs/path/to/layout[:tag]"), "{r}");
        let r = bad_reason("oci-archive:a.tar");
        assert!(r.contains("not absolute"), "{r}");
        assert!(r.contains("oci-archive:/abs/path/to/file.tar[:tag]"), "{r}");
    }

    #[test]
    fn missing_or_empty_parts() {
        assert!(bad_reason("oci:").contains("missing path"));
        assert!(bad_reason("oci-archive:").contains("missing path"));
        assert!(bad_reason("oci:/x:").contains("empty tag"));
        assert!(bad_reason("oci:/x:-bad").contains("must start with"));
        assert!(bad_reason("oci:/x:a b").contains("contains ' '"));
    }

    #[test]
    fn bare_paths_and_other_transports() {
        let r = bad_reason("/srv/layout");
        assert!(r.contains("oci:/srv/layout"), "{r}");
        let r = bad_reason("dir:/srv/x");
        assert!(r.contains("dir: transport is not supported"), "{r}");
        let r = bad_reason("docker-archive:/x.tar");
        assert!(r.contains("docker-archive:"), "{r}");
    }

    #[test]
    fn malformed_registry_references() {
        for s in [
            "",
            "Busybox",
            "busybox:",
            "busybox:la test",
            "foo//bar",
            "x@sha256:zz",
            "x@nothex",
            "x@sha512:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "docker://",
        ] {
            let r = bad_reason(s);
            assert!(r.contains("expected [registry/]repository"), "{s:?}: {r}");
        }
    }

    #[test]
    fn tag_accessor() {
        assert_eq!(parse("oci:/a:t").unwrap().tag(), Some("t"));
        assert_eq!(parse("oci:/a").unwrap().tag(), None);
        assert_eq!(parse("busybox:1").unwrap().tag(), None);
    }
}
