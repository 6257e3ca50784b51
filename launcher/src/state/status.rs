//! A VM's state as `list` reports it, derived from its record, the state
//! lock and `/proc` — there is no daemon that could know more.

use std::fmt;

use serde::Serialize;

use super::process::VmmProcess;
use super::record::{Phase, VmRecord};

/// What `list` says about a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// A `create` holds the lock right now.
    Creating,
    /// A `destroy` holds the lock right now.
    Destroying,
    /// A `create` or `destroy` that did not finish (killed, or failed to
    /// clean up): `create NAME` again or `destroy NAME` cleans it.
    Incomplete,
    /// The VMM process runs.
    Running,
    /// Created, not running.
    Stopped,
    /// A VMM was recorded as running and is gone (killed, or it died)
    /// without `stop`.
    Crashed,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Creating => "creating",
            Self::Destroying => "destroying",
            Self::Incomplete => "incomplete",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Crashed => "crashed",
        })
    }
}

/// The state of the VM `record` describes, given whether the state lock is
/// held by someone (`busy`) and whether a process is alive.
#[must_use]
pub fn classify(record: &VmRecord, busy: bool, alive: impl Fn(&VmmProcess) -> bool) -> VmState {
    match (record.phase, busy) {
        (Phase::Creating, true) => VmState::Creating,
        (Phase::Destroying, true) => VmState::Destroying,
        (Phase::Creating | Phase::Destroying, false) => VmState::Incomplete,
        (Phase::Ready, _) => match record.process() {
            None => VmState::Stopped,
            Some(p) if alive(&p) => VmState::Running,
            Some(_) => VmState::Crashed,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::tests::sample;

    #[test]
    fn running_stopped_and_crashed_come_from_the_pid() {
        let running = sample();
        assert_eq!(classify(&running, false, |_| true), VmState::Running);
        assert_eq!(classify(&running, true, |_| true), VmState::Running);
        assert_eq!(classify(&running, false, |_| false), VmState::Crashed);
        let mut stopped = sample();
        stopped.set_process(None);
        assert_eq!(classify(&stopped, false, |_| false), VmState::Stopped);
    }

    #[test]
    fn unfinished_phases_depend_on_the_lock() {
        let mut r = sample();
        r.phase = Phase::Creating;
        assert_eq!(classify(&r, true, |_| true), VmState::Creating);
        assert_eq!(classify(&r, false, |_| true), VmState::Incomplete);
        r.phase = Phase::Destroying;
        assert_eq!(classify(&r, true, |_| true), VmState::Destroying);
        assert_eq!(classify(&r, false, |_| false), VmState::Incomplete);
        assert_eq!(VmState::Incomplete.to_string(), "incomplete");
        assert_eq!(
            serde_json::to_string(&VmState::Crashed).unwrap(),
            "\"crashed\""
        );
    }
}
