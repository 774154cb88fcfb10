//! Traffic to each machine: what load balancing, concurrency limits and
//! autostop look at.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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

#[derive(Debug)]
struct Activity {
    /// The map's key, shared with the guards.
    id: Arc<str>,
    requests: usize,
    connections: usize,
    /// When the last request ended (or the machine was first seen idle).
    last: Instant,
}

impl Activity {
    /// The machine's entry, made on first sight (a lookup allocates
    /// nothing).
    fn of<'a>(machines: &'a mut HashMap<Arc<str>, Activity>, id: &str) -> &'a mut Activity {
        if !machines.contains_key(id) {
            let id: Arc<str> = id.into();
            let a = Activity {
                id: id.clone(),
                requests: 0,
                connections: 0,
                last: Instant::now(),
            };
            machines.insert(id, a);
        }
        machines.get_mut(id).expect("just inserted")
    }

    fn counter(&mut self, count: Count) -> &mut usize {
        match count {
            Count::Request => &mut self.requests,
            Count::Connection => &mut self.connections,
        }
    }
}

/// Per machine id.
#[derive(Debug, Default)]
pub(crate) struct Load {
    machines: Mutex<HashMap<Arc<str>, Activity>>,
    /// Woken whenever a guard is dropped: queued requests try again.
    released: Notify,
}

impl Load {
    /// Counts one more against the machine unless that would take it past
    /// `limit`.
    pub(crate) fn try_begin(self: &Arc<Self>, id: &str, count: Count, limit: Option<u32>) -> Option<Busy> {
        let mut machines = self.machines.lock().expect("load");
        let activity = Activity::of(&mut machines, id);
        let id = activity.id.clone();
        let counter = activity.counter(count);
        if limit.is_some_and(|l| *counter >= l as usize) {
            return None;
        }
        *counter += 1;
        Some(Busy {
            load: self.clone(),
            id,
            count,
        })
    }

    pub(crate) fn begin(self: &Arc<Self>, id: &str) -> Busy {
        self.try_begin(id, Count::Request, None).expect("no limit")
    }

    pub(crate) fn of(&self, id: &str, count: Count) -> usize {
        let mut machines = self.machines.lock().expect("load");
        machines.get_mut(id).map_or(0, |a| *a.counter(count))
    }

    /// Whether the machine has had no request in flight for `idle_for`.
    pub(crate) fn idle(&self, id: &str, idle_for: Duration) -> bool {
        let mut machines = self.machines.lock().expect("load");
        let a = Activity::of(&mut machines, id);
        a.requests == 0 && a.last.elapsed() >= idle_for
    }

    /// Resolves after the next guard is dropped, counting from this call
    /// (not from the first poll), so a release between a failed attempt and
    /// the wait is not missed.
    pub(crate) fn released(&self) -> impl Future<Output = ()> + '_ {
        let mut notified = Box::pin(self.released.notified());
        notified.as_mut().enable();
        notified
    }
}

/// Traffic in flight to a machine, counted until dropped.
#[derive(Debug)]
pub(crate) struct Busy {
    load: Arc<Load>,
    id: Arc<str>,
    count: Count,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(a) = self.load.machines.lock().expect("load").get_mut(&self.id) {
            let counter = a.counter(self.count);
            *counter = counter.saturating_sub(1);
            if self.count == Count::Request {
                a.last = Instant::now();
            }
        }
        self.load.released.notify_waiters();
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
