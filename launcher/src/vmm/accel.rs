//! Choosing the acceleration: KVM only when this host can really run the
//! guest with it, else TCG (QEMU's emulator).
//!
//! "Can really run" is two checks. The CPU must have hardware
//! virtualization (`vmx` or `svm` in `/proc/cpuinfo`): on hosts where
//! `/dev/kvm` belongs to a paravirtual module (PVM), it opens and answers,
//! yet a normal guest spins forever. And `/dev/kvm` must open and answer
//! `KVM_GET_API_VERSION` with the stable API version (12).

use std::fmt;
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};

/// `accel` in `launcher.toml`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    /// KVM when it works here, else TCG.
    #[default]
    Auto,
    /// KVM, unchecked.
    Kvm,
    /// TCG.
    Tcg,
}

/// The acceleration a VM runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's binary translator (slower; works everywhere).
    Tcg,
    /// No VM at all: a stub VMM command (benchmarks).
    None,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
            Self::None => "none",
        })
    }
}

/// An acceleration and the reason it was chosen (printed by `create`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelChoice {
    /// The acceleration.
    pub accel: Accel,
    /// Why.
    pub why: String,
}

/// The stable KVM API version.
const KVM_API_VERSION: libc::c_int = 12;
/// `KVM_GET_API_VERSION`: `_IO(KVMIO, 0x00)`, KVMIO = 0xAE.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

/// The CPU's hardware virtualization flag in `/proc/cpuinfo` text.
#[must_use]
pub fn virtualization_flag(cpuinfo: &str) -> Option<&'static str> {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))?
        .split_once(':')?
        .1;
    flags.split_whitespace().find_map(|f| match f {
        "vmx" => Some("vmx"),
        "svm" => Some("svm"),
        _ => None,
    })
}

/// Whether `/dev/kvm` opens and speaks the stable API.
fn kvm_device() -> Result<(), String> {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm does not open ({e})"))?;
    // SAFETY: `kvm` is an open /dev/kvm descriptor; KVM_GET_API_VERSION
    // takes no argument and only returns a number.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version == KVM_API_VERSION {
        Ok(())
    } else {
        Err(format!(
            "/dev/kvm answers KVM_GET_API_VERSION with {version}, not {KVM_API_VERSION}"
        ))
    }
}

/// Chooses by `setting`, probing this host for `auto`.
#[must_use]
pub fn choose(setting: AccelSetting) -> AccelChoice {
    match setting {
        AccelSetting::Kvm => AccelChoice {
            accel: Accel::Kvm,
            why: "accel = \"kvm\" in launcher.toml".into(),
        },
        AccelSetting::Tcg => AccelChoice {
            accel: Accel::Tcg,
            why: "accel = \"tcg\" in launcher.toml".into(),
        },
        AccelSetting::Auto => {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            decide(virtualization_flag(&cpuinfo), kvm_device)
        }
    }
}

/// The `auto` decision, given the CPU flag and a `/dev/kvm` probe (run only
/// when the flag is there).
fn decide(flag: Option<&str>, kvm: impl FnOnce() -> Result<(), String>) -> AccelChoice {
    let Some(flag) = flag else {
        return AccelChoice {
            accel: Accel::Tcg,
            why: "the CPU shows no vmx/svm flag, so /dev/kvm cannot run a normal guest here".into(),
        };
    };
    match kvm() {
        Ok(()) => AccelChoice {
            accel: Accel::Kvm,
            why: format!("the CPU has {flag} and /dev/kvm works"),
        },
        Err(why) => AccelChoice {
            accel: Accel::Tcg,
            why,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_comes_from_the_flags_line() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme vmx sse\nbugs\t\t: spectre\n";
        let amd = "flags\t\t: fpu svm sse\n";
        let neither = "flags\t\t: fpu sse hypervisor\nmodel name\t: vmx-like\n";
        assert_eq!(virtualization_flag(intel), Some("vmx"));
        assert_eq!(virtualization_flag(amd), Some("svm"));
        assert_eq!(virtualization_flag(neither), None);
        assert_eq!(virtualization_flag(""), None);
    }

    #[test]
    fn kvm_needs_the_flag_and_a_working_device() {
        let choice = decide(None, || panic!("not probed without the flag"));
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.why.contains("vmx/svm"), "{}", choice.why);
        assert_eq!(decide(Some("vmx"), || Ok(())).accel, Accel::Kvm);
        let choice = decide(Some("svm"), || Err("/dev/kvm does not open".into()));
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.why.contains("/dev/kvm"));
    }

    #[test]
    fn settings_force_a_choice() {
        assert_eq!(choose(AccelSetting::Tcg).accel, Accel::Tcg);
        assert_eq!(choose(AccelSetting::Kvm).accel, Accel::Kvm);
        // Whatever this host is, auto picks one of the two and says why.
        let auto = choose(AccelSetting::Auto);
        assert!(matches!(auto.accel, Accel::Kvm | Accel::Tcg));
        assert!(!auto.why.is_empty());
    }
}
