//! The capabilities a process in the inner container holds: every set
//! (bounding, permitted, effective, inheritable, ambient) given explicitly,
//! by name, when the process starts (see [`crate::spawn::Confinement`]).
//!
//! The set is Docker's default without `CAP_MKNOD` (device nodes cannot be
//! made in a user namespace anyway). The capabilities count in the
//! container's user namespace only: `CAP_CHOWN` lets root in the container
//! chown its own files, never the platform's; `CAP_NET_BIND_SERVICE` and
//! `CAP_NET_RAW` do nothing in a network namespace the VM's root owns
//! (ports below 1024 are opened to everyone in that namespace instead,
//! see `container::loopback_up`). `CAP_SYS_ADMIN`, `CAP_BPF`,
//! `CAP_PERFMON`, `CAP_NET_ADMIN`, `CAP_SYS_MODULE`, `CAP_SYS_PTRACE`,
//! `CAP_SYS_RAWIO`, `CAP_SYS_TIME`, `CAP_SYS_BOOT`, `CAP_SYSLOG`, … are in
//! no set at all.

use caps::Capability;

/// What a process started in the container may hold.
pub const KEPT: [Capability; 13] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_AUDIT_WRITE,
    Capability::CAP_SETFCAP,
];

/// Where the kernel says how many capabilities it has.
const CAP_LAST_CAP: &str = "/proc/sys/kernel/cap_last_cap";

/// The sets as the child of a spawn applies them (prepared before the
/// clone, so the child only makes system calls).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapSets {
    /// Every capability the kernel has that is not kept, to drop from the
    /// bounding set.
    pub drop_bounding: Vec<u32>,
    /// The permitted, effective and inheritable sets (all three the same):
    /// bit N is capability N.
    pub mask: u64,
}

impl CapSets {
    /// [`KEPT`], against the capabilities of the running kernel (those the
    /// `caps` crate may not know yet included, so that none stays in the
    /// bounding set by accident).
    #[must_use]
    pub fn container() -> Self {
        let known_last = caps::all().iter().map(Capability::index).max().unwrap_or(0);
        let last = std::fs::read_to_string(CAP_LAST_CAP)
            .ok()
            .and_then(|s| s.trim().parse::<u8>().ok())
            .map_or(known_last, |l| l.max(known_last));
        Self::keeping(&KEPT, last)
    }

    /// The sets that keep `kept` of capabilities `0..=last`.
    #[must_use]
    pub fn keeping(kept: &[Capability], last: u8) -> Self {
        let kept_index: Vec<u8> = kept.iter().map(Capability::index).collect();
        Self {
            drop_bounding: (0..=last)
                .filter(|i| !kept_index.contains(i))
                .map(u32::from)
                .collect(),
            mask: kept.iter().fold(0, |m, c| m | c.bitmask()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dangerous_capabilities_are_dropped_everywhere() {
        let sets = CapSets::container();
        for cap in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_BPF,
            Capability::CAP_PERFMON,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_SYS_MODULE,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_SYS_RAWIO,
            Capability::CAP_MKNOD,
            Capability::CAP_SYS_BOOT,
            Capability::CAP_DAC_READ_SEARCH,
        ] {
            assert!(
                sets.drop_bounding.contains(&u32::from(cap.index())),
                "{cap}"
            );
            assert_eq!(sets.mask & cap.bitmask(), 0, "{cap}");
        }
        for cap in KEPT {
            assert!(!sets.drop_bounding.contains(&u32::from(cap.index())));
            assert_ne!(sets.mask & cap.bitmask(), 0);
        }
    }

    #[test]
    fn capabilities_newer_than_the_crate_are_dropped_too() {
        let sets = CapSets::keeping(&[Capability::CAP_KILL], 45);
        assert!(sets.drop_bounding.contains(&45));
        assert!(!sets.drop_bounding.contains(&5));
        assert_eq!(sets.drop_bounding.len(), 45);
        assert_eq!(sets.mask, Capability::CAP_KILL.bitmask());
    }
}
