//! Credentials for registries: the docker/podman auth file format, and the
//! `WWW-Authenticate` challenges a registry answers with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{ImageError, Result};

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password, even in debug logs.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub(crate) fn basic_header(&self) -> String {
        let pair = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
    }
}

/// `auth.json` / `~/.docker/config.json`: only the parts we use.
#[derive(Debug, Default, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    /// base64("user:password").
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    /// An OAuth refresh token, sent as the password with user
    /// `<token>` (what docker does).
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// The auth files to look in, in the order containers-auth.json(5) gives:
/// an explicit one, else `$REGISTRY_AUTH_FILE`, the podman locations, and
/// docker's.
pub(crate) fn default_auth_files(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(path) = explicit {
        return vec![path.to_owned()];
    }
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(Path::new(&run).join("containers/auth.json"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        files.push(Path::new(&home).join(".config/containers/auth.json"));
        files.push(Path::new(&home).join(".docker/config.json"));
    }
    files
}

/// Finds credentials for `registry/repository` in the auth files: the first
/// file with a matching entry wins, and within it the longest matching
/// key (`reg/ns/repo`, then `reg/ns`, then `reg`). A missing file is
/// skipped; an unreadable or malformed one is an error, since silently
/// pulling anonymously would hide the mistake.
pub(crate) fn lookup(files: &[PathBuf], registry: &str, repository: &str) -> Result<Option<Credentials>> {
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(ImageError::Io {
                    context: format!("reading registry auth file {}", file.display()),
                    source: e,
                });
            }
        };
        let parsed: AuthFile = serde_json::from_str(&text).map_err(|e| ImageError::Config {
            what: format!("registry auth file {}", file.display()),
            reason: e.to_string(),
        })?;
        let keys = candidate_keys(registry, repository);
        for key in &keys {
            if let Some(entry) = find_entry(&parsed.auths, key) {
                return entry_credentials(entry, file, key).map(Some);
            }
        }
        if parsed.cred_helpers.contains_key(registry) || parsed.creds_store.is_some() {
            // Helpers run external programs; we don't. The pull goes on
            // anonymously, and this says why it may then be refused.
            tracing::warn!(
                "{} names a credential helper for {registry}; helpers are not supported, \
                 put the credentials in \"auths\" instead",
                file.display()
            );
        }
    }
    Ok(None)
}

/// `reg/ns/repo`, `reg/ns`, `reg`, plus Docker Hub's historical key.
fn candidate_keys(registry: &str, repository: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut path = format!("{registry}/{repository}");
    loop {
        keys.push(path.clone());
        match path.rfind('/') {
            Some(i) => path.truncate(i),
            None => break,
        }
    }
    if registry == "docker.io" {
        keys.push("https://index.docker.io/v1/".into());
        keys.push("index.docker.io".into());
    }
    keys
}

/// An entry by key, also accepting keys written as URLs
/// (`https://registry.example/`), as old docker versions did.
fn find_entry<'a>(auths: &'a BTreeMap<String, AuthEntry>, key: &str) -> Option<&'a AuthEntry> {
    auths.get(key).or_else(|| {
        auths.iter().find_map(|(k, v)| {
            let bare = k
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/');
            (bare == key).then_some(v)
        })
    })
}

fn entry_credentials(entry: &AuthEntry, file: &Path, key: &str) -> Result<Credentials> {
    let bad = |reason: &str| ImageError::Config {
        what: format!("registry auth file {} (entry {key:?})", file.display()),
        reason: reason.to_owned(),
    };
    if let Some(token) = &entry.identity_token {
        return Ok(Credentials {
            username: "<token>".into(),
            password: token.clone(),
        });
    }
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Credentials {
            username: username.clone(),
            password: password.clone(),
        });
    }
    let auth = entry.auth.as_deref().ok_or_else(|| bad("no \"auth\" field"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| bad("\"auth\" is not base64"))?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad("\"auth\" is not UTF-8"))?;
    let (username, password) = decoded
        .split_once(':')
        .ok_or_else(|| bad("\"auth\" is not base64 of user:password"))?;
    Ok(Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Basic realm="…"` or `Bearer realm="…",service="…",scope="…"`.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `k="v", k2=v2` with quoted values that may hold commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(parse_challenge("Basic realm=\"x\""), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge("bearer realm=http://t/x"),
            Some(Challenge::Bearer {
                realm: "http://t/x".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn auth_file_lookup_prefers_the_longest_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            &file,
            serde_json::json!({"auths": {
                "reg.example": {"auth": b64("a:1")},
                "reg.example/team": {"auth": b64("b:2")},
                "https://index.docker.io/v1/": {"auth": b64("hub:3")},
                "other.example": {"identitytoken": "tok"},
            }})
            .to_string(),
        )
        .unwrap();
        let files = vec![dir.path().join("missing.json"), file.clone()];
        let get = |reg: &str, repo: &str| lookup(&files, reg, repo).unwrap().map(|c| (c.username, c.password));
        assert_eq!(get("reg.example", "team/app"), Some(("b".into(), "2".into())));
        assert_eq!(get("reg.example", "solo/app"), Some(("a".into(), "1".into())));
        assert_eq!(get("docker.io", "library/busybox"), Some(("hub".into(), "3".into())));
        assert_eq!(get("other.example", "x"), Some(("<token>".into(), "tok".into())));
        assert_eq!(get("nobody.example", "x"), None);

        std::fs::write(&file, "{not json").unwrap();
        let e = lookup(&files, "reg.example", "x").unwrap_err().to_string();
        assert!(e.contains("auth.json"), "{e}");
    }
}
