//! A client for the OCI distribution API: just what pulling needs
//! (manifests and blobs, read-only), with anonymous, basic and bearer-token
//! auth.
//!
//! Written on reqwest rather than taken from `oci-client`: that crate reads
//! bodies without bounds and cannot resume a blob into a file, and the
//! descriptor, index and platform logic is already in this crate.

mod auth;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RANGE, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};
use serde::Deserialize;

use auth::Challenge;
pub use auth::Credentials;

use crate::error::{ImageError, Result};
use crate::oci;
use crate::reference::RegistryRef;

/// Index and manifest documents are read into memory; anything bigger than
/// this is not a plausible one.
const MAX_MANIFEST: usize = 4 << 20;

/// Every manifest type we can read. Registries pick by `Accept`, and some
/// (distribution 2.8) answer 404 or 400 for a type not listed here.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// How the daemon talks to registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// A docker/podman auth file (`{"auths": {"host": {"auth": …}}}`). When
    /// unset, the usual places are searched: `$REGISTRY_AUTH_FILE`,
    /// `$XDG_RUNTIME_DIR/containers/auth.json`,
    /// `~/.config/containers/auth.json`, `~/.docker/config.json`.
    pub auth_file: Option<PathBuf>,
    /// PEM certificates trusted for HTTPS registries, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Registries (`host[:port]`) that may be reached over plain HTTP when
    /// they do not speak HTTPS. Loopback ones (`localhost`, `127.0.0.0/8`,
    /// `[::1]`) always may.
    pub insecure: Vec<String>,
}

/// A registry client. Cheap to clone; one serves every registry.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    auth_files: Vec<PathBuf>,
    insecure: Vec<String>,
}

impl RegistryClient {
    pub fn new(config: &RegistryConfig) -> Result<RegistryClient> {
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("hangar/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            // Between two reads of a body, not for the whole body: a big
            // layer on a slow link may take long, a stalled one may not.
            .read_timeout(Duration::from_secs(60));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| ImageError::Io {
                context: format!("reading registry CA file {}", ca.display()),
                source: e,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ImageError::Config {
                what: format!("registry CA file {}", ca.display()),
                reason: e.to_string(),
            })?;
            if certs.is_empty() {
                return Err(ImageError::Config {
                    what: format!("registry CA file {}", ca.display()),
                    reason: "no PEM certificate in it".into(),
                });
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().map_err(|e| ImageError::Config {
            what: "registry client settings".into(),
            reason: error_chain(&e),
        })?;
        Ok(RegistryClient {
            http,
            auth_files: auth::default_auth_files(config.auth_file.as_deref()),
            insecure: config.insecure.clone(),
        })
    }

    /// A handle on one repository, with its credentials looked up.
    pub(crate) async fn repository(&self, r: &RegistryRef, access: Access) -> Result<Repository> {
        let host = r.api_host();
        let scheme = self.scheme(host, &r.registry).await;
        Ok(Repository {
            http: self.http.clone(),
            base: format!("{scheme}://{host}/v2/{}", r.repository),
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            credentials: auth::lookup(&self.auth_files, &r.registry, &r.repository)?,
            authorization: tokio::sync::Mutex::new(None),
            access,
        })
    }

    /// HTTPS, except for loopback and `insecure` registries that do not
    /// speak it: those are tried over HTTPS first (certificates verified
    /// as usual) and reached over plain HTTP if the TLS connection fails,
    /// as docker and podman do.
    async fn scheme(&self, host: &str, registry: &str) -> &'static str {
        let insecure = is_loopback(host) || self.insecure.iter().any(|i| i == host || i == registry);
        if !insecure {
            return "https";
        }
        match self.http.get(format!("https://{host}/v2/")).send().await {
            // Any answer over TLS (401 included) means it speaks TLS, and
            // so does a certificate we do not trust: that error is the one
            // to report, not whatever plain HTTP would say.
            Ok(_) => "https",
            Err(e) if is_certificate_error(&e) => "https",
            Err(_) => "http",
        }
    }
}

/// Makes ring the process's TLS crypto provider. Every process that builds
/// a `reqwest::Client` must call this first: the workspace's reqwest has
/// rustls without a built-in provider (the default one, aws-lc-rs, is a
/// long C build), and building a client without one panics.
pub fn install_crypto_provider() {
    static PROVIDER: OnceLock<()> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        // Fails only if another provider was installed first, which is as
        // good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn is_loopback(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.ends_with(':') => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What a token is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Pull,
    Push,
}

/// One repository in one registry, and how we currently authenticate to it.
#[derive(Debug)]
pub(crate) struct Repository {
    http: reqwest::Client,
    /// `scheme://host/v2/<repository>`.
    base: String,
    registry: String,
    repository: String,
    credentials: Option<Credentials>,
    /// The `Authorization` value that worked last (basic, or a bearer
    /// token); `None` until a challenge asks for one.
    authorization: tokio::sync::Mutex<Option<String>>,
    access: Access,
}

/// A manifest or index as the registry served it, verified.
#[derive(Debug)]
pub(crate) struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// The error body of the distribution API.
#[derive(Deserialize)]
struct ErrorsBody {
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl Repository {
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Fetches a manifest or index by tag or digest, and checks it against
    /// the digest it was asked by (or the one the registry claims).
    pub async fn manifest(&self, reference: &str) -> Result<FetchedManifest> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(MANIFEST_TYPES));
        let url = format!("{}/manifests/{reference}", self.base);
        let what = format!("{}/{}:{reference}", self.registry, self.repository);
        let response = self.get(&url, headers, &what).await?;
        let media_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .unwrap_or_default();
        let claimed = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = self.read_small(response, &what).await?;
        let digest = oci::digest_of(&bytes);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_owned())
        } else {
            claimed.filter(|c| c.starts_with("sha256:"))
        };
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest {what}"),
                expected,
                actual: digest,
            });
        }
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Starts downloading a blob, from byte `offset` on. The answer is
    /// 200 (the whole blob) or 206 (the rest); the caller checks which.
    pub async fn blob(&self, digest: &str, offset: u64) -> Result<Response> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            headers.insert(
                RANGE,
                HeaderValue::from_str(&format!("bytes={offset}-")).expect("ascii"),
            );
        }
        let url = format!("{}/blobs/{digest}", self.base);
        let what = format!("blob {digest} of {}/{}", self.registry, self.repository);
        self.get(&url, headers, &what).await
    }

    /// Turns a transport failure into a registry error that says which.
    pub fn transport_error(&self, e: &reqwest::Error) -> ImageError {
        let detail = if is_certificate_error(e) {
            format!(
                "its TLS certificate is not trusted ({}); if it is signed by a private CA, \
                 pass that CA with hangar serve --registry-ca-file",
                error_chain(e)
            )
        } else if e.is_connect() {
            format!(
                "cannot connect ({}); check the registry's address and that it is running",
                error_chain(e)
            )
        } else if e.is_timeout() {
            format!("timed out ({})", error_chain(e))
        } else {
            error_chain(e)
        };
        ImageError::Registry {
            registry: self.registry.clone(),
            detail,
        }
    }

    /// A GET that answers a 401 challenge once (getting a token or sending
    /// basic credentials), then maps error statuses to errors.
    async fn get(&self, url: &str, headers: HeaderMap, what: &str) -> Result<Response> {
        let response = self.send(|http| http.get(url).headers(headers.clone())).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(self.status_error(response, what).await)
    }

    /// Sends the request `build` makes, with the authorization that worked
    /// last; on a 401 answers the challenge (a token, or basic credentials)
    /// and sends it once more. Any other answer is returned as it is.
    async fn send(&self, build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder) -> Result<Response> {
        let mut fresh = false;
        loop {
            let mut request = build(&self.http);
            if let Some(authorization) = self.authorization.lock().await.clone() {
                request = request.header(AUTHORIZATION, authorization);
            }
            let response = request.send().await.map_err(|e| self.transport_error(&e))?;
            if response.status() == StatusCode::UNAUTHORIZED && !fresh {
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(auth::parse_challenge);
                self.authenticate(challenge).await?;
                fresh = true;
                continue;
            }
            return Ok(response);
        }
    }

    /// Uploads a blob the registry lacks, streamed from `path`.
    pub async fn put_blob(&self, digest: &str, size: u64, path: &std::path::Path) -> Result<()> {
        let what = format!("blob {digest} to {}/{}", self.registry, self.repository);
        let url = format!("{}/blobs/{digest}", self.base);
        let head = self.send(|http| http.head(&url)).await?;
        if head.status().is_success() {
            return Ok(());
        }
        let uploads = format!("{}/blobs/uploads/", self.base);
        let started = self.send(|http| http.post(&uploads)).await?;
        if started.status() != StatusCode::ACCEPTED {
            return Err(self.status_error(started, &what).await);
        }
        let location = started
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ImageError::Registry {
                registry: self.registry.clone(),
                detail: format!("started an upload of {what} without saying where (no Location)"),
            })?;
        let mut put_url = reqwest::Url::parse(&self.base)
            .and_then(|base| base.join(location))
            .map_err(|e| ImageError::Registry {
                registry: self.registry.clone(),
                detail: format!("gave an unusable upload location {location:?}: {e}"),
            })?;
        put_url.query_pairs_mut().append_pair("digest", digest);
        let file = tokio::fs::File::open(path).await.map_err(|e| ImageError::Io {
            context: format!("opening {}", path.display()),
            source: e,
        })?;
        let chunks = futures_util::stream::try_unfold(file, |mut file| async move {
            let mut buf = vec![0u8; 1 << 20];
            let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf).await?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((n > 0).then(|| (bytes::Bytes::from(buf), file)))
        });
        // The upload URL carries its own session: no second try on a 401.
        let mut request = self
            .http
            .put(put_url)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(chunks));
        if let Some(authorization) = self.authorization.lock().await.clone() {
            request = request.header(AUTHORIZATION, authorization);
        }
        let done = request.send().await.map_err(|e| self.transport_error(&e))?;
        if done.status() != StatusCode::CREATED {
            return Err(self.status_error(done, &what).await);
        }
        Ok(())
    }

    /// Puts a manifest under `reference` (a tag).
    pub async fn put_manifest(&self, reference: &str, media_type: &str, bytes: Vec<u8>) -> Result<()> {
        let url = format!("{}/manifests/{reference}", self.base);
        let what = format!("manifest {}/{}:{reference}", self.registry, self.repository);
        let response = self
            .send(|http| http.put(&url).header(CONTENT_TYPE, media_type).body(bytes.clone()))
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.status_error(response, &what).await);
        }
        Ok(())
    }

    async fn authenticate(&self, challenge: Option<Challenge>) -> Result<()> {
        let value = match challenge {
            None => {
                return Err(self.unauthorized("it asked for credentials in a way we do not understand".into()));
            }
            Some(Challenge::Basic) => match &self.credentials {
                Some(c) => c.basic_header(),
                None => return Err(self.unauthorized(self.needs_credentials())),
            },
            Some(Challenge::Bearer { realm, service, .. }) => self.fetch_token(&realm, service.as_deref()).await?,
        };
        *self.authorization.lock().await = Some(value);
        Ok(())
    }

    /// Gets a pull token from the registry's token server, with our
    /// credentials if we have some (anonymous otherwise).
    async fn fetch_token(&self, realm: &str, service: Option<&str>) -> Result<String> {
        let url = reqwest::Url::parse(realm).map_err(|e| ImageError::Registry {
            registry: self.registry.clone(),
            detail: format!("its token server address {realm:?} is not a URL: {e}"),
        })?;
        let actions = match self.access {
            Access::Pull => "pull",
            Access::Push => "pull,push",
        };
        let scope = format!("repository:{}:{actions}", self.repository);
        let mut query = vec![("scope", scope.as_str())];
        if let Some(service) = service {
            query.push(("service", service));
        }
        let mut request = self.http.get(url).query(&query);
        if let Some(c) = &self.credentials {
            request = request.header(AUTHORIZATION, c.basic_header());
        }
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        match response.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let detail = match &self.credentials {
                    Some(c) => format!("its token server refused the credentials of user {:?}", c.username),
                    None => self.needs_credentials(),
                };
                return Err(self.unauthorized(detail));
            }
            s => {
                return Err(ImageError::Registry {
                    registry: self.registry.clone(),
                    detail: format!("its token server {realm} answered HTTP {s}"),
                });
            }
        }
        let body = self.read_small(response, "token").await?;
        let token: TokenResponse = serde_json::from_slice(&body).map_err(|e| ImageError::Registry {
            registry: self.registry.clone(),
            detail: format!("its token server {realm} sent an unreadable answer: {e}"),
        })?;
        let token = token.token.or(token.access_token).ok_or_else(|| ImageError::Registry {
            registry: self.registry.clone(),
            detail: format!("its token server {realm} sent no token"),
        })?;
        Ok(format!("Bearer {token}"))
    }

    fn needs_credentials(&self) -> String {
        format!(
            "it needs credentials and none are configured for {}: add them to the registry auth file \
             (hangar serve --registry-auth-file FILE, docker/podman auth.json format)",
            self.registry
        )
    }

    fn unauthorized(&self, detail: String) -> ImageError {
        ImageError::Unauthorized {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            detail,
        }
    }

    async fn status_error(&self, response: Response, what: &str) -> ImageError {
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        let errors: Vec<ErrorEntry> = serde_json::from_slice::<ErrorsBody>(&body)
            .map(|b| b.errors)
            .unwrap_or_default();
        let said = errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        let said = if said.is_empty() {
            String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_owned()
        } else {
            said
        };
        match status {
            StatusCode::NOT_FOUND => ImageError::NotFound {
                what: what.to_owned(),
                detail: format!(
                    "the registry answered 404 ({}); check the repository and tag",
                    if said.is_empty() { "no details" } else { &said }
                ),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => self.unauthorized(match &self.credentials {
                Some(c) => format!("HTTP {status} with the credentials of user {:?}: {said}", c.username),
                None => format!("HTTP {status}: {said}; {}", self.needs_credentials()),
            }),
            _ => ImageError::Registry {
                registry: self.registry.clone(),
                detail: format!("HTTP {status} for {what}: {said}"),
            },
        }
    }

    /// Reads a small body (manifest, token) with a size cap.
    async fn read_small(&self, mut response: Response, what: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport_error(&e))? {
            if bytes.len() + chunk.len() > MAX_MANIFEST {
                return Err(ImageError::Registry {
                    registry: self.registry.clone(),
                    detail: format!("{what} is larger than {} MiB", MAX_MANIFEST >> 20),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }
}

/// Whether TLS failed on the server's certificate (untrusted, expired,
/// wrong name) rather than on the connection.
fn is_certificate_error(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        // io::Error::source skips the error it wraps (and connectors nest
        // io::Errors): unwrap those by hand.
        let mut candidate = s;
        loop {
            if matches!(
                candidate.downcast_ref::<rustls::Error>(),
                Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
            ) {
                return true;
            }
            match candidate.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
                Some(inner) => candidate = inner,
                None => break,
            }
        }
        source = s.source();
    }
    false
}

/// An error and its sources on one line (reqwest's own message is often
/// just "error sending request").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.1.2.3:80",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(super::is_loopback(h), "{h}");
        }
        for h in ["docker.io", "10.0.0.1:5000", "localhost.example:5000", "[::2]:5000"] {
            assert!(!super::is_loopback(h), "{h}");
        }
    }
}
