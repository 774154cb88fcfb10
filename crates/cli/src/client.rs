//! A small client of the daemon's REST API.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use hangar_api::ErrorBody;
use reqwest::{Method, RequestBuilder, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Where the daemon is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    /// The daemon's import directory, for a daemon on this host (see
    /// `stage`).
    pub import_dir: Option<PathBuf>,
}

/// Finds the daemon: explicit URL and token (flags or `HANGAR_URL` /
/// `HANGAR_TOKEN`), else the files a local daemon writes into its data dir.
pub fn connect(url: Option<String>, token: Option<String>, data_dir: &Path) -> Result<Client> {
    let mut import_dir = None;
    let url = match url {
        Some(u) => u,
        None => {
            let about = data_dir.join("daemon.json");
            let text = std::fs::read_to_string(&about).with_context(|| {
                format!(
                    "no daemon address: set HANGAR_URL, pass --url, or start `hangar serve --data-dir {}`",
                    data_dir.display()
                )
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("reading {}", about.display()))?;
            import_dir = v["import_dir"].as_str().map(PathBuf::from);
            v["url"]
                .as_str()
                .ok_or_else(|| anyhow!("{} has no url", about.display()))?
                .to_owned()
        }
    };
    let token = match token {
        Some(t) => t,
        None => {
            let path: PathBuf = data_dir.join("api-token");
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!(
                        "no API token: set HANGAR_TOKEN, pass --token, or make {} readable",
                        path.display()
                    )
                })?
                .trim()
                .to_owned()
        }
    };
    Ok(Client {
        http: {
            hangar_image::install_crypto_provider();
            reqwest::Client::builder().no_proxy().build()?
        },
        base: url.trim_end_matches('/').to_owned(),
        token,
        import_dir,
    })
}

impl Client {
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Sends and turns a JSON error body into an error with its message.
    pub async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the daemon at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => bail!("{} ({})", body.error, status.as_u16()),
            Err(_) => bail!("daemon answered {status}: {text}"),
        }
    }

    pub async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        let resp = self.send(req).await?;
        resp.json().await.context("reading the daemon's answer")
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(self.request(Method::GET, path)).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.json(self.request(Method::POST, path).json(body)).await
    }
}
