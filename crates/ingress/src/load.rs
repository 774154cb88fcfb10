//! Traffic to each machine: what load balancing, concurrency limits and
//! autostop look at.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// What a [`Busy`] guard counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    /// A request until its answer has been sent, or an upgraded connection
    /// until it closes.
    Request,
    /// A client connection, from its first request to the machine until it
    /// closes.
    Connection,
}

/// One machine's traffic, counted without a lock: every request counts,
/// from both of the runtime's workers.
#[derive(Debug)]
struct Activity {
    requests: AtomicUsize,
    connections: AtomicUsize,
    /// Requests ended so far: a count, not a clock, so that a request's
    /// end costs no clock read; [`Load::idle`] notes when it changes.
    ended: AtomicU64,
    /// `ended` as [`Load::idle`] last saw it, and since when.
    seen: Mutex<(u64, Instant)>,
}

impl Activity {
    fn counter(&self, count: Count) -> &AtomicUsize {
        match count {
            Count::Request => &self.requests,
            Count::Connection => &self.connections,
        }
    }
}

/// Per machine id.
#[derive(Debug)]
pub(crate) struct Load {
    machines: RwLock<HashMap<String, Arc<Activity>>>,
    /// Woken when a guard is dropped while requests wait: they try again.
    released: Notify,
    /// Requests waiting for a release.
    waiting: AtomicUsize,
}

impl Default for Load {
    fn default() -> Load {
        Load {
            machines: RwLock::default(),
            released: Notify::new(),
            waiting: AtomicUsize::new(0),
        }
    }
}

impl Load {
    /// The machine's entry, made on first sight.
    fn activity(&self, id: &str) -> Arc<Activity> {
        if let Some(a) = self.machines.read().expect("load").get(id) {
            return a.clone();
        }
        let mut machines = self.machines.write().expect("load");
        let a = machines.entry(id.to_owned()).or_insert_with(|| {
            Arc::new(Activity {
                requests: AtomicUsize::new(0),
                connections: AtomicUsize::new(0),
                ended: AtomicU64::new(0),
                seen: Mutex::new((0, Instant::now())),
            })
        });
        a.clone()
    }

    /// Counts one more against the machine unless that would take it past
    /// `limit`.
    pub(crate) fn try_begin(self: &Arc<Self>, id: &str, count: Count, limit: Option<u32>) -> Option<Busy> {
        let activity = self.activity(id);
        let counter = activity.counter(count);
        let mut n = counter.load(Ordering::SeqCst);
        loop {
            if limit.is_some_and(|l| n >= l as usize) {
                return None;
            }
            match counter.compare_exchange_weak(n, n + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        Some(Busy {
            load: self.clone(),
            activity,
            count,
        })
    }

    pub(crate) fn begin(self: &Arc<Self>, id: &str) -> Busy {
        self.try_begin(id, Count::Request, None).expect("no limit")
    }

    pub(crate) fn of(&self, id: &str, count: Count) -> usize {
        let machines = self.machines.read().expect("load");
        machines.get(id).map_or(0, |a| a.counter(count).load(Ordering::SeqCst))
    }

    /// Whether the machine has had no request in flight for `idle_for`,
    /// as far as calls to this tell: a request that ended since the last
    /// call counts as ending now (autostop calls it once a second).
    pub(crate) fn idle(&self, id: &str, idle_for: Duration) -> bool {
        let a = self.activity(id);
        let ended = a.ended.load(Ordering::SeqCst);
        let mut seen = a.seen.lock().expect("load");
        if seen.0 != ended {
            *seen = (ended, Instant::now());
        }
        a.requests.load(Ordering::SeqCst) == 0 && seen.1.elapsed() >= idle_for
    }

    /// Resolves after the next guard is dropped, counting from this call
    /// (not from the first poll), so a release between a failed attempt and
    /// the wait is not missed.
    pub(crate) fn released(&self) -> impl Future<Output = ()> + '_ {
        // Before listening: a guard dropped after this sees the waiter, and
        // one dropped before has released what the next attempt counts.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting = Waiting(self);
        let mut notified = Box::pin(self.released.notified());
        notified.as_mut().enable();
        async move {
            let _waiting = waiting;
            notified.await
        }
    }
}

/// A request waiting for a release, until dropped.
struct Waiting<'a>(&'a Load);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Traffic in flight to a machine, counted until dropped.
#[derive(Debug)]
pub(crate) struct Busy {
    load: Arc<Load>,
    activity: Arc<Activity>,
    count: Count,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.activity.counter(self.count).fetch_sub(1, Ordering::SeqCst);
        if self.count == Count::Request {
            self.activity.ended.fetch_add(1, Ordering::SeqCst);
        }
        // Notify takes a lock: only when someone waits.
        if self.load.waiting.load(Ordering::SeqCst) > 0 {
            self.load.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_what_they_name() {
        let load = Arc::new(Load::default());
        let a = load.try_begin("m", Count::Request, Some(2)).unwrap();
        let _b = load.try_begin("m", Count::Request, Some(2)).unwrap();
        assert!(load.try_begin("m", Count::Request, Some(2)).is_none(), "at the limit");
        let _c = load
            .try_begin("m", Count::Connection, Some(1))
            .expect("connections count apart");
        assert!(load.try_begin("m", Count::Connection, Some(1)).is_none());
        drop(a);
        assert_eq!(load.of("m", Count::Request), 1);
        assert!(load.try_begin("m", Count::Request, Some(2)).is_some(), "room again");
        assert!(!load.idle("m", Duration::ZERO), "a request is in flight");
    }

    #[tokio::test]
    async fn a_release_wakes_a_waiter_registered_before_it() {
        let load = Arc::new(Load::default());
        let busy = load.begin("m");
        let released = load.released();
        drop(busy);
        tokio::time::timeout(Duration::from_secs(1), released)
            .await
            .expect("the release before the first poll counts");
    }
}
