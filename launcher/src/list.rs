//! List: every VM with its state (running / stopped / crashed / …, see
//! [`crate::state::status`]). Reads the records without taking the lock —
//! they are replaced atomically — and only probes whether the lock is held.

use serde_json::Value;

use crate::state::lock;
use crate::state::process::VmmProcess;
use crate::state::record::VmRecord;
use crate::state::status::{self, VmState};
use crate::{Launcher, LauncherError};

/// One VM as `list` shows it.
#[derive(Clone, Debug)]
pub struct ListedVm {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// Its record (none for a directory whose create stopped before the
    /// record was written, or whose record is damaged).
    pub record: Option<VmRecord>,
}

impl ListedVm {
    /// The JSON of `list --json`: the record's fields plus `state`.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let mut value = self.record.as_ref().map_or_else(
            || Value::Object(serde_json::Map::new()),
            |r| serde_json::to_value(r).expect("a record serializes"),
        );
        value["name"] = self.name.clone().into();
        value["state"] = serde_json::to_value(self.state).expect("a state serializes");
        value
    }
}

impl Launcher {
    /// Every VM, by name.
    ///
    /// # Errors
    /// [`LauncherError::State`] when the state directory cannot be read.
    pub fn list(&self) -> Result<Vec<ListedVm>, LauncherError> {
        let busy = std::cell::OnceCell::new();
        let busy = || *busy.get_or_init(|| lock::is_held(&self.state.lock_file()));
        let mut vms = Vec::new();
        for name in self.state.vm_names()? {
            let (state, record) = match VmRecord::load(&self.state.vm(&name)) {
                Ok(Some(record)) => {
                    let state = status::classify(&record, busy(), VmmProcess::is_alive);
                    (state, Some(record))
                }
                Ok(None) => (
                    if busy() {
                        VmState::Creating
                    } else {
                        VmState::Incomplete
                    },
                    None,
                ),
                Err(e) => {
                    tracing::warn!(vm = %name, %e, "unreadable record");
                    (VmState::Incomplete, None)
                }
            };
            vms.push(ListedVm {
                name: name.to_string(),
                state,
                record,
            });
        }
        Ok(vms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::tests::sample;

    #[test]
    fn the_json_is_the_record_plus_the_state() {
        let vm = ListedVm {
            name: "vm1".into(),
            state: VmState::Running,
            record: Some(sample()),
        };
        let json = vm.to_json();
        assert_eq!(json["name"], "vm1");
        assert_eq!(json["state"], "running");
        assert_eq!(json["address"], "10.123.0.2");
        assert_eq!(json["tap"], "nb2");
        assert_eq!(json["pid"], 4242);
        assert_eq!(json["accel"], "tcg");
        let bare = ListedVm {
            name: "half".into(),
            state: VmState::Incomplete,
            record: None,
        };
        assert_eq!(
            bare.to_json(),
            serde_json::json!({"name": "half", "state": "incomplete"})
        );
    }
}
