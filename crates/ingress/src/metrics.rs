//! Counters per machine and route kind, in Prometheus's text format.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::load::{Count, Load};

/// (app, machine, route kind).
pub(crate) type MetricKey = (String, String, &'static str);

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: u64,
    /// Answered by the proxy with a 5xx (the machine could not be reached,
    /// or stayed at its hard limit).
    pub(crate) failures: u64,
    pub(crate) wakes: u64,
    /// Request to the answer's first byte, summed over wakes.
    pub(crate) wake_seconds: f64,
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    counters: Mutex<BTreeMap<MetricKey, Counters>>,
    /// Requests waiting for room, by (app, machine); `*` for an app route,
    /// which waits for any of the app's machines.
    queued: Mutex<BTreeMap<(String, String), usize>>,
}

impl Metrics {
    pub(crate) fn count(&self, key: &MetricKey, f: impl FnOnce(&mut Counters)) {
        f(self.counters.lock().expect("metrics").entry(key.clone()).or_default());
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
        let counters = self.counters.lock().expect("metrics");
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
            out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for l in lines {
                out += &format!("{name}{l}\n");
            }
        };
        let each = |f: &dyn Fn(&Counters) -> String| -> Vec<String> {
            counters
                .iter()
                .map(|((app, machine, route), c)| {
                    format!("{{app=\"{app}\",machine=\"{machine}\",route=\"{route}\"}} {}", f(c))
                })
                .collect()
        };
        family(
            "hangar_proxy_requests_total",
            "counter",
            "Requests the ingress proxy routed to a machine.",
            each(&|c| c.requests.to_string()),
        );
        family(
            "hangar_proxy_failures_total",
            "counter",
            "Requests the proxy answered itself with a 5xx: the machine could not be woken or reached.",
            each(&|c| c.failures.to_string()),
        );
        family(
            "hangar_proxy_wakes_total",
            "counter",
            "Starts (or resumes) of a stopped or suspended machine for a request.",
            each(&|c| c.wakes.to_string()),
        );
        family(
            "hangar_proxy_wake_seconds_sum",
            "counter",
            "Seconds from the request that started a machine to its answer's first byte, summed.",
            each(&|c| format!("{:.6}", c.wake_seconds)),
        );
        let machines: BTreeSet<(&String, &String)> = counters.keys().map(|(a, m, _)| (a, m)).collect();
        family(
            "hangar_proxy_active",
            "gauge",
            "Requests and upgraded connections in flight to a machine.",
            machines
                .iter()
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
