//! A burst of creates: many machines asked for at once, each timed from
//! its create to the answer of its first exec, beside the same for one
//! machine alone. On a small host a burst is bound by CPU (each launch is
//! mostly the runtime's); what is measured is how long each caller waits.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::hangar::{APP, Config, Daemon};
use crate::stats::nearest_rank;

/// create → first exec, in ms: p50, p95, max and n.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Wait {
    pub n: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
}

impl Wait {
    fn of(samples: &[Duration]) -> Wait {
        let ms = |p| nearest_rank(samples, p).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        Wait {
            n: samples.len(),
            p50_ms: ms(50.0),
            p95_ms: ms(95.0),
            max_ms: ms(100.0),
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub alone: Wait,
    pub burst: Wait,
}

impl Report {
    pub fn table(&self) -> String {
        let row = |what: &str, w: &Wait| {
            format!(
                "| {what:<38} | {:>8.1} | {:>8.1} | {:>8.1} | {:>3} |\n",
                w.p50_ms, w.p95_ms, w.max_ms, w.n
            )
        };
        let mut out = String::from("create → first exec `true`, in ms\n\n");
        out += "| machines                               |      p50 |      p95 |      max |   n |\n";
        out += "|----------------------------------------|----------|----------|----------|-----|\n";
        out += &row("one at a time", &self.alone);
        out += &row(&format!("{} created at once", self.burst.n), &self.burst);
        out
    }
}

/// One create and first exec, timed, through a client of its own.
async fn create_and_exec(http: &reqwest::Client, url: &str, token: &str, image: &str) -> Result<Duration> {
    let call = |method: Method, path: String, body: Value| {
        http.request(method, format!("{url}{path}"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let t = Instant::now();
    let resp = call(
        Method::POST,
        format!("/v1/apps/{APP}/machines"),
        json!({"config": {"image": image}}),
    )
    .await?;
    if !resp.status().is_success() {
        bail!("create: {}: {}", resp.status(), resp.text().await?);
    }
    let m: Value = resp.json().await?;
    let id = m["id"].as_str().context("create answered no id")?;
    let exec = call(
        Method::POST,
        format!("/v1/apps/{APP}/machines/{id}/exec"),
        json!({"command": ["true"]}),
    )
    .await?;
    if !exec.status().is_success() {
        bail!("exec: {}: {}", exec.status(), exec.text().await?);
    }
    Ok(t.elapsed())
}

/// `alone` machines one after another, then `machines` at once.
pub fn bench(cfg: &Config, image: &str, machines: usize, alone: usize) -> Result<Report> {
    let d = Daemon::start(cfg)?;
    d.call(Method::POST, "/v1/apps", Some(json!({ "app_name": APP })))?;
    let (url, token) = d.endpoint();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    rt.block_on(async {
        // The first create imports the image: not counted.
        create_and_exec(&http, url, token, image).await?;
        let mut one = Vec::new();
        for _ in 0..alone {
            one.push(create_and_exec(&http, url, token, image).await?);
        }
        let all = futures_util::future::join_all((0..machines).map(|_| create_and_exec(&http, url, token, image)));
        let burst = all.await.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(Report {
            alone: Wait::of(&one),
            burst: Wait::of(&burst),
        })
    })
}
