//! Counters per machine and route kind, in Prometheus's text format.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::load::{Count, Load};

/// How a request reached its machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteKind {
    /// `{machine}.{app}.{domain}`.
    Machine,
    /// `{port}-{machine}.{app}.{domain}`.
    Port,
    /// `{app}.{domain}`, or a session of the app.
    App,
    /// Sent on by a machine's `hangar-replay`.
    Replay,
}

impl RouteKind {
    const ALL: [RouteKind; 4] = [RouteKind::Machine, RouteKind::Port, RouteKind::App, RouteKind::Replay];

    fn as_str(self) -> &'static str {
        match self {
            RouteKind::Machine => "machine",
            RouteKind::Port => "port",
            RouteKind::App => "app",
            RouteKind::Replay => "replay",
        }
    }
}

/// One machine's counters, by route kind: counted without a lock, since
/// every request counts.
#[derive(Debug)]
pub(crate) struct MachineCounters {
    app: String,
    by_route: [Counters; RouteKind::ALL.len()],
}

impl MachineCounters {
    pub(crate) fn route(&self, kind: RouteKind) -> &Counters {
        &self.by_route[kind as usize]
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests: AtomicU64,
    /// Answered by the proxy with a 5xx (the machine could not be reached,
    /// or stayed at its hard limit).
    failures: AtomicU64,
    wakes: AtomicU64,
    /// Request to the answer's first byte, summed over wakes.
    wake_micros: AtomicU64,
}

impl Counters {
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn wake(&self, took: Duration) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
        self.wake_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    fn seen(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
    }
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Machine id (unique across apps) → its counters.
    machines: RwLock<HashMap<String, Arc<MachineCounters>>>,
    /// Requests waiting for room, by (app, machine); `*` for an app route,
    /// which waits for any of the app's machines.
    queued: Mutex<BTreeMap<(String, String), usize>>,
}

impl Metrics {
    pub(crate) fn machine(&self, app: &str, id: &str) -> Arc<MachineCounters> {
        if let Some(c) = self.machines.read().expect("metrics").get(id) {
            return c.clone();
        }
        let mut machines = self.machines.write().expect("metrics");
        let c = machines.entry(id.to_owned()).or_insert_with(|| {
            Arc::new(MachineCounters {
                app: app.to_owned(),
                by_route: Default::default(),
            })
        });
        c.clone()
    }

    /// One more request queued for `key` unless `limit` are already; the
    /// guard takes it off.
    pub(crate) fn enqueue(&self, key: (String, String), limit: usize) -> Option<Queued<'_>> {
        let mut queued = self.queued.lock().expect("queue");
        let depth = queued.entry(key.clone()).or_default();
        if *depth >= limit {
            return None;
        }
        *depth += 1;
        Some(Queued { metrics: self, key })
    }

    pub(crate) fn render(&self, load: &Load) -> String {
        let machines: BTreeMap<(String, String), Arc<MachineCounters>> = self
            .machines
            .read()
            .expect("metrics")
            .iter()
            .map(|(id, c)| ((c.app.clone(), id.clone()), c.clone()))
            .collect();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
            out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for l in lines {
                out += &format!("{name}{l}\n");
            }
        };
        let each = |f: &dyn Fn(&Counters) -> String| -> Vec<String> {
            let mut lines = Vec::new();
            for ((app, machine), c) in &machines {
                for route in RouteKind::ALL {
                    let c = c.route(route);
                    if c.seen() {
                        let route = route.as_str();
                        lines.push(format!(
                            "{{app=\"{app}\",machine=\"{machine}\",route=\"{route}\"}} {}",
                            f(c)
                        ));
                    }
                }
            }
            lines
        };
        let read = |n: &AtomicU64| n.load(Ordering::Relaxed);
        family(
            "hangar_proxy_requests_total",
            "counter",
            "Requests the ingress proxy routed to a machine.",
            each(&|c| read(&c.requests).to_string()),
        );
        family(
            "hangar_proxy_failures_total",
            "counter",
            "Requests the proxy answered itself with a 5xx: the machine could not be woken or reached.",
            each(&|c| read(&c.failures).to_string()),
        );
        family(
            "hangar_proxy_wakes_total",
            "counter",
            "Starts (or resumes) of a stopped or suspended machine for a request.",
            each(&|c| read(&c.wakes).to_string()),
        );
        family(
            "hangar_proxy_wake_seconds_sum",
            "counter",
            "Seconds from the request that started a machine to its answer's first byte, summed.",
            each(&|c| format!("{:.6}", read(&c.wake_micros) as f64 / 1e6)),
        );
        family(
            "hangar_proxy_active",
            "gauge",
            "Requests and upgraded connections in flight to a machine.",
            machines
                .keys()
                .map(|(app, m)| format!("{{app=\"{app}\",machine=\"{m}\"}} {}", load.of(m, Count::Request)))
                .collect(),
        );
        family(
            "hangar_proxy_queue_depth",
            "gauge",
            "Requests waiting for a machine below its hard_limit (machine \"*\": any of the app's).",
            self.queued
                .lock()
                .expect("queue")
                .iter()
                .map(|((app, m), n)| format!("{{app=\"{app}\",machine=\"{m}\"}} {n}"))
                .collect(),
        );
        out
    }
}

/// A request in the queue.
pub(crate) struct Queued<'a> {
    metrics: &'a Metrics,
    key: (String, String),
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(depth) = self.metrics.queued.lock().expect("queue").get_mut(&self.key) {
            *depth = depth.saturating_sub(1);
        }
    }
}
