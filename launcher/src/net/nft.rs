//! A VM's nftables table, `inet nestbox-<tap>`, made in one `nft -f -`
//! transaction that first adds the table, then deletes it, then defines it
//! whole: the result is the same whether or not it existed, and it applies
//! fully or not at all. Default deny for what comes from the VM:
//!
//! - `input` (packets from the VM to the host itself, on any of the host's
//!   addresses): only replies to connections the host opened (the host's
//!   curl to the VM's URL, the launcher's nothing else). The VM needs
//!   nothing from the host: no DHCP, DNS or metadata service is served.
//! - `forward`: packets whose source is not the guest's address are
//!   dropped (no spoofing), and so is any IPv6 (VMs have none); replies to
//!   connections made *to* the VM pass; then other VMs (the launcher's taps
//!   and its pool) are refused, whatever the allow-list says; then the
//!   allow-list of `launcher.toml` passes; then the link-local range
//!   (169.254.0.0/16, where clouds keep their metadata service), RFC 1918,
//!   CGNAT (100.64.0.0/10), loopback, "this network", benchmarking,
//!   multicast and reserved ranges are refused; the rest is egress (or
//!   refused too when egress is off).
//! - `postrouting` (with egress): the guest's traffic leaving by any other
//!   interface is masqueraded.

use std::fmt::Write as _;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::NetError;
use super::prefix::Ipv4Prefix;

/// The ranges a VM may not reach unless allow-listed: link-local
/// (metadata services), private (RFC 1918), shared address space (CGNAT,
/// RFC 6598), loopback, "this network", IETF protocol assignments,
/// benchmarking (RFC 2544), multicast, reserved and broadcast.
pub const DENIED: [&str; 11] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// What a VM's table is made from. `tap` and `tap_prefix` are checked names
/// (letters, digits, `-`, `_`), safe inside quotes.
#[derive(Clone, Debug)]
pub struct Rules<'a> {
    /// The VM's tap.
    pub tap: &'a str,
    /// The launcher's tap prefix: every other VM is behind one of these.
    pub tap_prefix: &'a str,
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// The pool every VM's address comes from.
    pub pool: &'a str,
    /// Whether the guest reaches beyond the host (masquerade).
    pub egress: bool,
    /// Prefixes the guest may reach although they are in [`DENIED`].
    pub allow: &'a [Ipv4Prefix],
}

/// The table of the VM on `tap`.
#[must_use]
pub fn table_name(tap: &str) -> String {
    format!("nestbox-{tap}")
}

/// The transaction that defines the VM's table.
#[must_use]
pub fn ruleset(r: &Rules<'_>) -> String {
    let Rules {
        tap,
        tap_prefix,
        guest,
        pool,
        ..
    } = *r;
    let table = table_name(tap);
    let denied = DENIED.join(", ");
    let mut script = format!(
        "table ip {table}\n\
         delete table ip {table}\n\
         table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{tap}\" ct state established,related accept\n\
         \t\tiifname \"{tap}\" drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{tap}\" meta nfproto ipv6 drop\n\
         \t\tiifname \"{tap}\" ip saddr != {guest} drop\n\
         \t\tiifname \"{tap}\" ct state established,related accept\n\
         \t\tiifname \"{tap}\" oifname \"{tap_prefix}*\" drop\n\
         \t\tiifname \"{tap}\" ip daddr {pool} drop\n"
    );
    if !r.allow.is_empty() {
        let allow: Vec<String> = r.allow.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            script,
            "\t\tiifname \"{tap}\" ip daddr {{ {} }} accept",
            allow.join(", ")
        );
    }
    let _ = writeln!(script, "\t\tiifname \"{tap}\" ip daddr {{ {denied} }} drop");
    if !r.egress {
        let _ = writeln!(script, "\t\tiifname \"{tap}\" drop");
    }
    script.push_str("\t}\n");
    if r.egress {
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
/// none; an `ip` table of an older launcher goes too).
#[must_use]
pub fn delete_script(tap: &str) -> String {
    let table = table_name(tap);
    format!(
        "table ip {table}\ndelete table ip {table}\ntable inet {table}\ndelete table inet {table}\n"
    )
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

    fn rules(egress: bool, allow: &[Ipv4Prefix]) -> String {
        ruleset(&Rules {
            tap: "nb2",
            tap_prefix: "nb",
            guest: GUEST,
            pool: "10.123.0.0/16",
            egress,
            allow,
        })
    }

    // What the rules *do* is tested with real packets from real VMs
    // (tests/tests/vm_host_boundary.rs); these check the transaction's shape.

    #[test]
    fn the_table_is_replaced_whole_in_one_transaction() {
        let s = rules(true, &[]);
        assert!(
            s.starts_with(
                "table ip nestbox-nb2\ndelete table ip nestbox-nb2\n\
                 table inet nestbox-nb2\ndelete table inet nestbox-nb2\ntable inet nestbox-nb2 {\n"
            ),
            "{s}"
        );
        assert!(s.ends_with("}\n"));
    }

    #[test]
    fn the_allow_list_comes_after_the_vm_to_vm_drop_and_before_the_denied_ranges() {
        let allow = ["10.99.0.0/24".parse().unwrap()];
        let s = rules(true, &allow);
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle}: {s}"));
        assert!(at("oifname \"nb*\" drop") < at("{ 10.99.0.0/24 } accept"));
        assert!(at("ip daddr 10.123.0.0/16 drop") < at("{ 10.99.0.0/24 } accept"));
        assert!(at("{ 10.99.0.0/24 } accept") < at("169.254.0.0/16"));
        assert!(!rules(true, &[]).contains("accept\n\t\tiifname \"nb2\" ip daddr {"));
    }

    #[test]
    fn without_egress_nothing_new_leaves_and_nothing_is_masqueraded() {
        let s = rules(false, &[]);
        assert!(!s.contains("masquerade"), "{s}");
        assert!(
            s.contains("\t\tiifname \"nb2\" drop\n\t}\n\tchain")
                || s.ends_with("\t\tiifname \"nb2\" drop\n\t}\n}\n"),
            "{s}"
        );
        assert!(rules(true, &[]).contains("ip saddr 10.123.0.2 oifname != \"nb2\" masquerade"));
    }

    #[test]
    fn deleting_never_fails_for_a_missing_table_of_either_family() {
        assert_eq!(
            delete_script("nv12"),
            "table ip nestbox-nv12\ndelete table ip nestbox-nv12\ntable inet nestbox-nv12\ndelete table inet nestbox-nv12\n"
        );
    }
}
