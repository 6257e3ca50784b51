//! A VM's record, `vm.json`: everything the launcher decided for the VM
//! (address, tap, sizes) and, while it runs, its VMM process. Written
//! before anything else exists for the VM and replaced atomically at each
//! step, so that whatever a killed launcher left can be found and undone.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::process::VmmProcess;
use super::{StateError, VmDir};
use crate::vmm::accel::Accel;

/// Where the VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// `create` is under way (or was interrupted): resources may exist in
    /// part.
    Creating,
    /// Created: running or stopped.
    Ready,
    /// `destroy` is under way (or failed part-way).
    Destroying,
}

/// `vm.json`. Unknown fields are accepted, so that a launcher reads the
/// records of a newer one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM's name.
    pub name: String,
    /// Where it is in its life.
    pub phase: Phase,
    /// Its address's offset in the pool (also the tap's suffix).
    pub index: u32,
    /// The guest's address.
    pub address: Ipv4Addr,
    /// The host's address on the tap (the guest's gateway).
    pub host_address: Ipv4Addr,
    /// The pool's prefix length (the guest's).
    pub prefix_len: u8,
    /// The tap device.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u8,
    /// The port served at `https://NAME.DOMAIN/`.
    pub primary_port: u16,
    /// The user disk's size in GiB (the data disk's, for a VM made before
    /// VMs had a user disk).
    pub disk_gib: u32,
    /// Whether the VM has a user disk for the container's writable layer.
    /// VMs made before there was one keep that layer on their data disk
    /// (nothing of it is lost by an update); re-create them to separate it.
    #[serde(default)]
    pub user_disk: bool,
    /// `create --from`: the object store checkpoint (`BUCKET/PREFIX@ID`)
    /// the user's disk is built from on its first boot (kept: a start
    /// before the rebuild finished tries again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The VMM backend (`qemu`).
    pub vmm: String,
    /// The acceleration of the last start.
    pub accel: Accel,
    /// The guest image version of the last start.
    pub image_version: String,
    /// When the VM was created (RFC 3339, UTC).
    pub created: String,
    /// The VMM's pid, while it runs (or until a crash is noticed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The VMM's start time (`/proc/PID/stat` field 22), with `pid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
}

impl VmRecord {
    /// The recorded VMM process, if any.
    #[must_use]
    pub fn process(&self) -> Option<VmmProcess> {
        Some(VmmProcess {
            pid: self.pid?,
            start_time: self.pid_start?,
        })
    }

    /// Records (or clears) the VMM process.
    pub fn set_process(&mut self, process: Option<VmmProcess>) {
        self.pid = process.map(|p| p.pid);
        self.pid_start = process.map(|p| p.start_time);
    }

    /// Reads the record in `dir`; `None` when there is none.
    ///
    /// # Errors
    /// [`StateError`] when it cannot be read or parsed.
    pub fn load(dir: &VmDir) -> Result<Option<Self>, StateError> {
        let path = dir.record();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::io("read", &path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Record { path, source })
    }

    /// Replaces the record in `dir` atomically.
    ///
    /// # Errors
    /// [`StateError::Io`].
    pub fn save(&self, dir: &VmDir) -> Result<(), StateError> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a record serializes");
        bytes.push(b'\n');
        nestbox_durable::write_atomic(&dir.record(), &bytes, 0o600)
            .map_err(std::io::Error::from)
            .map_err(StateError::io("write", &dir.record()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::name::VmName;
    use crate::state::StateDir;

    pub(crate) fn sample() -> VmRecord {
        VmRecord {
            name: "vm1".into(),
            phase: Phase::Ready,
            index: 2,
            address: Ipv4Addr::new(10, 123, 0, 2),
            host_address: Ipv4Addr::new(10, 123, 0, 1),
            prefix_len: 16,
            tap: "nb2".into(),
            mac: "02:6e:62:7b:00:02".into(),
            memory_mib: 512,
            cpus: 1,
            primary_port: 8080,
            disk_gib: 1,
            user_disk: true,
            from: None,
            vmm: "qemu".into(),
            accel: Accel::Tcg,
            image_version: "0.1.0+abc".into(),
            created: "2026-11-29T03:00:00Z".into(),
            pid: Some(4242),
            pid_start: Some(99),
        }
    }

    #[test]
    fn a_record_round_trips_through_its_file() {
        let root = std::env::temp_dir().join(format!("nb-record-{}", std::process::id()));
        let state = StateDir::new(&root);
        let dir = state.vm(&VmName::new("vm1").unwrap());
        dir.create().unwrap();
        assert_eq!(VmRecord::load(&dir).unwrap(), None);
        let mut record = sample();
        record.save(&dir).unwrap();
        assert_eq!(VmRecord::load(&dir).unwrap(), Some(record.clone()));
        let text = std::fs::read_to_string(dir.record()).unwrap();
        assert!(text.contains("\"phase\": \"ready\""), "{text}");
        assert!(text.contains("\"accel\": \"tcg\""), "{text}");
        assert!(text.contains("\"pid\": 4242"), "{text}");
        record.set_process(None);
        record.save(&dir).unwrap();
        let text = std::fs::read_to_string(dir.record()).unwrap();
        assert!(!text.contains("pid"), "{text}");
        assert_eq!(VmRecord::load(&dir).unwrap().unwrap().process(), None);
        std::fs::write(dir.record(), "{").unwrap();
        let err = VmRecord::load(&dir).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_record_from_before_user_disks_has_none() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json.as_object_mut().unwrap().remove("user_disk");
        let back: VmRecord = serde_json::from_value(json).unwrap();
        assert!(!back.user_disk);
    }

    #[test]
    fn unknown_fields_from_a_newer_launcher_are_accepted() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json["later"] = 1.into();
        let back: VmRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, sample());
    }
}
