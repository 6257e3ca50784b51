//! A VM's nftables table, `ip nestbox-<tap>`, made in one `nft -f -`
//! transaction that first adds the table, then deletes it, then defines it
//! whole: the result is the same whether or not it existed, and it applies
//! fully or not at all.
//!
//! - `forward`: packets from the tap with a source other than the guest's
//!   address are dropped (no spoofing), and so is anything from the tap to
//!   another tap of the launcher's prefix (tenant isolation);
//! - `input`: the same anti-spoofing for packets to the host itself;
//! - `postrouting` (with egress): the guest's traffic leaving by any other
//!   interface is masqueraded.

use std::fmt::Write as _;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::NetError;

/// The table of the VM on `tap`.
#[must_use]
pub fn table_name(tap: &str) -> String {
    format!("nestbox-{tap}")
}

/// The transaction that defines the VM's table. `tap` and `tap_prefix`
/// are checked names (letters, digits, `-`, `_`), safe inside quotes.
#[must_use]
pub fn ruleset(tap: &str, tap_prefix: &str, guest: Ipv4Addr, egress: bool) -> String {
    let table = table_name(tap);
    let mut script = format!(
        "table ip {table}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{tap}\" ip saddr != {guest} drop\n\
         \t\tiifname \"{tap}\" oifname \"{tap_prefix}*\" drop\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{tap}\" ip saddr != {guest} drop\n\
         \t}}\n"
    );
    if egress {
        let _ = write!(
            script,
            "\tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {guest} oifname != \"{tap}\" masquerade\n\
             \t}}\n"
        );
    }
    script.push_str("}\n");
    script
}

/// The transaction that removes the VM's table (and succeeds when there is
/// none).
#[must_use]
pub fn delete_script(tap: &str) -> String {
    let table = table_name(tap);
    format!("table ip {table}\ndelete table ip {table}\n")
}

/// Runs `script` through `nft -f -`. nft dies with the launcher
/// (`PR_SET_PDEATHSIG`): a launcher killed mid-create must not leave an
/// nft that loads the VM's table after the next command removed it.
///
/// # Errors
/// [`NetError::NftMissing`] when nft cannot run, [`NetError::Nft`] with its
/// message when it refuses.
pub fn apply(tap: &str, script: &str) -> Result<(), NetError> {
    tracing::debug!(table = %table_name(tap), "nft transaction");
    let mut cmd = Command::new("nft");
    // SAFETY: runs in the forked child before exec and only makes the
    // prctl(2) system call, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetError::NftMissing)?;
    let written = child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes());
    let out = child.wait_with_output().map_err(NetError::NftMissing)?;
    if !out.status.success() || written.is_err() {
        return Err(NetError::Nft {
            table: table_name(tap),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 123, 0, 2);

    #[test]
    fn the_table_is_replaced_whole_in_one_transaction() {
        let s = ruleset("nb2", "nb", GUEST, true);
        assert!(
            s.starts_with(
                "table ip nestbox-nb2\ndelete table ip nestbox-nb2\ntable ip nestbox-nb2 {\n"
            ),
            "{s}"
        );
        assert!(s.ends_with("}\n"));
    }

    #[test]
    fn spoofing_and_tap_to_tap_traffic_are_dropped() {
        let s = ruleset("nb2", "nb", GUEST, true);
        assert!(
            s.contains("type filter hook forward priority filter; policy accept;"),
            "{s}"
        );
        assert!(
            s.contains("iifname \"nb2\" ip saddr != 10.123.0.2 drop"),
            "{s}"
        );
        assert!(s.contains("iifname \"nb2\" oifname \"nb*\" drop"), "{s}");
        assert_eq!(s.matches("ip saddr != 10.123.0.2 drop").count(), 2, "{s}");
    }

    #[test]
    fn egress_is_masquerade_out_of_any_other_interface() {
        let s = ruleset("nb2", "nb", GUEST, true);
        assert!(
            s.contains("type nat hook postrouting priority srcnat; policy accept;"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr 10.123.0.2 oifname != \"nb2\" masquerade"),
            "{s}"
        );
        let without = ruleset("nb2", "nb", GUEST, false);
        assert!(!without.contains("masquerade"), "{without}");
        assert!(without.contains("chain forward"), "{without}");
    }

    #[test]
    fn deleting_never_fails_for_a_missing_table() {
        assert_eq!(
            delete_script("nv12"),
            "table ip nestbox-nv12\ndelete table ip nestbox-nv12\n"
        );
    }
}
