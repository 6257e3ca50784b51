//! The guest kernel's command line (the contract with the image and PID 1,
//! `notes/issue5-contract.md`): a fast, quiet boot on the serial console,
//! and where PID 1 finds its configuration. The kernel keeps its CPU
//! vulnerability mitigations unless `launcher.toml` says `mitigations =
//! false`: the boundary between the user's code and the platform runs
//! through that kernel.
//!
//! `tsc_early_khz` is required under QEMU's microvm machine: it has no PIT
//! or HPET to calibrate the TSC against, and the kernel hangs without it.
//! The host's TSC rate is the value (`cpu MHz` in `/proc/cpuinfo`).

use std::fmt::Write as _;

use crate::guest_config::CONFIG_SERIAL;

/// Boot flags that make the guest kernel start fast and quietly.
const FAST: &str = "console=ttyS0 quiet tsc=reliable no_timer_check cryptomgr.notests";

/// The command line, with `tsc_early_khz` when the rate is known, and
/// `mitigations=off` only when `mitigations` is false.
#[must_use]
pub fn kernel_cmdline(tsc_khz: Option<u64>, mitigations: bool) -> String {
    let mut line = FAST.to_owned();
    if !mitigations {
        line.push_str(" mitigations=off");
    }
    if let Some(khz) = tsc_khz {
        let _ = write!(line, " tsc_early_khz={khz}");
    }
    let _ = write!(line, " panic=-1 nestbox.config=virtio:{CONFIG_SERIAL}");
    line
}

/// The first `cpu MHz` of `/proc/cpuinfo` text, in kHz.
#[must_use]
pub fn tsc_khz(cpuinfo: &str) -> Option<u64> {
    let mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split_once(':')?
        .1
        .trim();
    let (whole, frac) = mhz.split_once('.').unwrap_or((mhz, ""));
    let whole: u64 = whole.parse().ok()?;
    // Three decimals make kHz; more are dropped, fewer padded.
    let frac: String = frac.chars().chain("000".chars()).take(3).collect();
    let frac: u64 = frac.parse().ok()?;
    Some(whole * 1000 + frac).filter(|&khz| khz > 0)
}

/// This host's TSC rate in kHz, if `/proc/cpuinfo` says.
#[must_use]
pub fn host_tsc_khz() -> Option<u64> {
    tsc_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_is_the_contracts() {
        assert_eq!(
            kernel_cmdline(Some(2_793_436), true),
            "console=ttyS0 quiet tsc=reliable no_timer_check cryptomgr.notests \
             tsc_early_khz=2793436 panic=-1 nestbox.config=virtio:nestbox-config"
        );
        assert!(!kernel_cmdline(None, true).contains("tsc_early_khz"));
        assert!(!kernel_cmdline(None, true).contains("mitigations"));
        assert!(kernel_cmdline(None, false).contains(" mitigations=off "));
    }

    #[test]
    fn mhz_become_khz() {
        let cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2793.436\ncpu MHz\t\t: 1.0\n";
        assert_eq!(tsc_khz(cpuinfo), Some(2_793_436));
        assert_eq!(tsc_khz("cpu MHz\t: 2400\n"), Some(2_400_000));
        assert_eq!(tsc_khz("cpu MHz\t: 2400.5\n"), Some(2_400_500));
        assert_eq!(tsc_khz("cpu MHz\t: 2400.12345\n"), Some(2_400_123));
        assert_eq!(tsc_khz("cpu MHz\t: x\n"), None);
        assert_eq!(tsc_khz("cpu MHz\t: 0.000\n"), None);
        assert_eq!(tsc_khz("model name\t: whatever\n"), None);
    }
}
