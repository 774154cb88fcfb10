//! Stopping (or suspending) machines nobody is using.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hangar_api::{Autostop, MachineService, MachineState, StopRequest};
use hangar_machine::Error;

use crate::Ingress;

/// Once a second: stops (or suspends) machines whose service asks for it
/// and that have had no request in flight for their idle timeout, never
/// leaving fewer of the app's machines running than `min_machines_running`,
/// and never a machine that said it is busy.
pub(crate) async fn run(ing: Arc<Ingress>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Err(e) = once(&ing).await {
            tracing::warn!("autostop: {e}");
        }
    }
}

/// What autostop does with a machine, from all of its services: it acts
/// if any service asks (traffic to any service keeps the machine up), after
/// the longest idle timeout among those that ask, never below the largest
/// `min_machines_running`, and stops rather than suspends if any asks to.
#[derive(Debug, PartialEq, Eq)]
struct Policy {
    action: Autostop,
    idle_for: Duration,
    min_machines_running: u32,
}

impl Policy {
    fn of(services: &[MachineService]) -> Option<Policy> {
        let asking: Vec<&MachineService> = services.iter().filter(|s| s.autostop != Autostop::Off).collect();
        let action = if asking.iter().any(|s| s.autostop == Autostop::Stop) {
            Autostop::Stop
        } else {
            asking.first()?.autostop
        };
        Some(Policy {
            action,
            idle_for: asking
                .iter()
                .map(|s| Duration::from_secs(s.idle_timeout_s.unwrap_or(300)))
                .max()?,
            min_machines_running: asking.iter().map(|s| s.min_machines_running).max()?,
        })
    }
}

async fn once(ing: &Ingress) -> Result<(), Error> {
    for app in ing.mgr.list_apps().await? {
        let machines = ing.mgr.list_machines(&app.name, &[], &BTreeMap::new(), false).await?;
        let mut running = machines
            .iter()
            .filter(|m| m.state == MachineState::Started && !m.config.services.is_empty())
            .count();
        for m in &machines {
            let Some(policy) = Policy::of(&m.config.services) else {
                continue;
            };
            if m.state != MachineState::Started {
                continue;
            }
            let idle_for = policy.idle_for;
            if !ing.load.idle(&m.id, idle_for)
                || running <= policy.min_machines_running as usize
                || ing.mgr.machine_is_busy(&app.name, &m.id).await?
            {
                continue;
            }
            let result = match policy.action {
                Autostop::Suspend => ing.mgr.suspend_machine(&app.name, &m.id).await,
                _ => ing.mgr.stop_machine(&app.name, &m.id, StopRequest::default()).await,
            };
            match result {
                Ok(_) => {
                    tracing::info!(machine = %m.id, "autostop: idle for {idle_for:?}");
                    running -= 1;
                }
                Err(e) => tracing::warn!(machine = %m.id, "autostop: {e}"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(autostop: &str, idle: Option<u64>, min: u32) -> MachineService {
        serde_json::from_value(serde_json::json!({
            "internal_port": 80, "autostop": autostop, "idle_timeout_s": idle, "min_machines_running": min,
        }))
        .unwrap()
    }

    #[test]
    fn every_service_counts() {
        assert_eq!(Policy::of(&[]), None);
        assert_eq!(Policy::of(&[service("off", Some(1), 0)]), None, "off by default");
        // A second service left at its default does not turn autostop off.
        assert_eq!(
            Policy::of(&[service("off", None, 0), service("suspend", Some(60), 1)]),
            Some(Policy {
                action: Autostop::Suspend,
                idle_for: Duration::from_secs(60),
                min_machines_running: 1
            })
        );
        // The longest timeout, the largest minimum, and stop over suspend.
        assert_eq!(
            Policy::of(&[service("suspend", Some(600), 0), service("stop", None, 2)]),
            Some(Policy {
                action: Autostop::Stop,
                idle_for: Duration::from_secs(600),
                min_machines_running: 2
            })
        );
    }
}
