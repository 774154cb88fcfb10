//! Stopping (or suspending) machines nobody is using.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hangar_api::{Autostop, MachineState, StopRequest};
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

async fn once(ing: &Ingress) -> Result<(), Error> {
    for app in ing.mgr.list_apps().await? {
        let machines = ing.mgr.list_machines(&app.name, &[], &BTreeMap::new(), false).await?;
        let mut running = machines
            .iter()
            .filter(|m| m.state == MachineState::Started && !m.config.services.is_empty())
            .count();
        for m in &machines {
            let Some(service) = m.config.services.first() else {
                continue;
            };
            if service.autostop == Autostop::Off || m.state != MachineState::Started {
                continue;
            }
            let idle_for = Duration::from_secs(service.idle_timeout_s.unwrap_or(300));
            if !ing.load.idle(&m.id, idle_for)
                || running <= service.min_machines_running as usize
                || ing.mgr.machine_is_busy(&app.name, &m.id).await?
            {
                continue;
            }
            let result = match service.autostop {
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
