//! The machine state machine: every state, and the one function that says
//! which moves between them are legal.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a machine is in its life. See `../shared/DESIGN.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    /// Image being resolved and the root filesystem laid out.
    Creating,
    /// Created with `skip_launch`: never started yet.
    Created,
    Starting,
    Started,
    Stopping,
    /// Not running: costs only disk.
    Stopped,
    /// The main process died and the restart policy said not to restart.
    Failed,
    Suspending,
    /// Paused with its memory kept (runc: frozen; runsc: checkpointed to
    /// disk). `start` resumes it where it stopped. Uses no CPU and is not
    /// billed as running.
    Suspended,
    Destroying,
    Destroyed,
}

impl MachineState {
    pub const ALL: [MachineState; 11] = [
        Self::Creating,
        Self::Created,
        Self::Starting,
        Self::Started,
        Self::Stopping,
        Self::Stopped,
        Self::Failed,
        Self::Suspending,
        Self::Suspended,
        Self::Destroying,
        Self::Destroyed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Started => "started",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Suspending => "suspending",
            Self::Suspended => "suspended",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
        }
    }

    /// Whether `self → next` is a legal move. This is the whole state machine:
    /// callers check here instead of comparing states themselves.
    pub fn can_become(self, next: MachineState) -> bool {
        use MachineState::*;
        matches!(
            (self, next),
            (Creating, Created | Starting | Destroying)
                | (Created | Stopped | Failed, Starting | Destroying)
                | (Starting, Started | Stopped | Failed)
                | (Started, Stopping | Stopped | Failed | Destroying | Suspending)
                | (Stopping, Stopped | Failed)
                | (Suspending, Suspended | Started | Stopped | Failed)
                | (Suspended, Starting | Stopping | Stopped | Failed)
                | (Destroying, Destroyed)
        )
    }

    /// A machine in a state that holds no sandbox: safe to start or destroy.
    pub fn is_at_rest(self) -> bool {
        matches!(self, Self::Created | Self::Stopped | Self::Failed)
    }
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for MachineState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            let all: Vec<_> = Self::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown machine state {s:?}; expected one of {}", all.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::MachineState::*;
    use super::*;

    #[test]
    fn round_trips_names() {
        for st in MachineState::ALL {
            assert_eq!(st.as_str().parse::<MachineState>().unwrap(), st);
        }
        assert!("running".parse::<MachineState>().is_err());
    }

    #[test]
    fn destroyed_is_final_and_nothing_skips_destroying() {
        for st in MachineState::ALL {
            assert!(!Destroyed.can_become(st));
            assert_eq!(st.can_become(Destroyed), st == Destroying);
        }
    }

    #[test]
    fn at_rest_machines_start_and_running_ones_stop() {
        for st in [Created, Stopped, Failed] {
            assert!(st.can_become(Starting));
            assert!(!st.can_become(Stopping));
        }
        assert!(Started.can_become(Stopping));
        assert!(!Stopping.can_become(Starting));
        assert!(!Started.can_become(Started));
        // A started machine is not started again (no dead edge), while a
        // suspended one is: a start resumes it.
        assert!(!Started.can_become(Starting));
        assert!(Suspended.can_become(Starting));
    }
}
