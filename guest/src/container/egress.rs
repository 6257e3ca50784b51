//! The inner container's way out: a veth pair made with rtnetlink (the
//! root side has `root_addr`/32 and a /32 route to `inner_addr`; the other
//! end is born inside the container as `eth0` with `inner_addr` and a
//! default route through the root side), IP forwarding, and an nftables
//! masquerade rule so that user code reaches the network with the VM's
//! address. Nothing comes in this way: the ingress dials inside the
//! container's namespace instead.
//!
//! A bounce must not wait for the old pair to go: deleting an interface (or
//! moving one between namespaces) waits for RCU grace periods, tens of
//! milliseconds here. So the rebuilt container's pair takes another of a few
//! root-side names, the old one is deleted in the background, and the route
//! to the container is *replaced* onto the new link (the /32 address on both
//! links meanwhile is harmless).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Stdio;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

/// The root side's interface names, used in turn (enough for the old pairs
/// that wait to be deleted, see the guest's graveyard, and the current one).
pub const ROOT_LINKS: [&str; 12] = [
    "nb-inner0",
    "nb-inner1",
    "nb-inner2",
    "nb-inner3",
    "nb-inner4",
    "nb-inner5",
    "nb-inner6",
    "nb-inner7",
    "nb-inner8",
    "nb-inner9",
    "nb-inner10",
    "nb-inner11",
];
/// Both, as an nftables interface pattern.
const ROOT_LINK_PATTERN: &str = "nb-inner*";
/// The nftables table that holds the masquerade rule.
const TABLE: &str = "nestbox";

/// Egress addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Egress {
    /// Whether the container gets a way out at all.
    pub enabled: bool,
    /// The root side's address (the container's gateway).
    pub root_addr: Ipv4Addr,
    /// The container's address.
    pub inner_addr: Ipv4Addr,
    /// The prefix length of the link between them.
    pub prefix_len: u8,
}

impl Default for Egress {
    fn default() -> Self {
        Self {
            enabled: true,
            root_addr: Ipv4Addr::new(10, 88, 0, 1),
            inner_addr: Ipv4Addr::new(10, 88, 0, 2),
            prefix_len: 30,
        }
    }
}

/// Errors setting egress up.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// A netlink request failed.
    #[error("netlink: {what}: {source}")]
    Netlink {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: rtnetlink::Error,
    },
    /// Something outside netlink failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// nft refused the rules.
    #[error("nft refused the masquerade rule (is nftables installed?): {0}")]
    Nft(String),
}

fn nl(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> EgressError {
    move |source| EgressError::Netlink { what, source }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> EgressError {
    move |source| EgressError::Io { what, source }
}

/// A netlink connection in this process's namespace.
fn connect() -> Result<Handle, EgressError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(io("netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink connection whose socket lives in the namespace at `netns`
/// (made on a thread that entered it, waited for off the runtime thread).
async fn connect_in(netns: &Path) -> Result<Handle, EgressError> {
    let runtime = tokio::runtime::Handle::current();
    let netns = netns.to_owned();
    let made = tokio::task::spawn_blocking(move || {
        crate::netns::run_in(Some(&netns), move || {
            let _entered = runtime.enter();
            rtnetlink::new_connection()
        })
    })
    .await
    .map_err(|e| EgressError::Io {
        what: "enter the container's network namespace",
        source: std::io::Error::other(e.to_string()),
    })?
    .map_err(|e| EgressError::Io {
        what: "enter the container's network namespace",
        source: std::io::Error::other(e.to_string()),
    })?;
    let (conn, handle, _) = made.map_err(io("netlink socket in the container"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The index of the link `name` in `handle`'s namespace, if it exists
/// (also used by PID 1's network setup).
pub(crate) async fn link_index(
    handle: &Handle,
    name: &str,
) -> Result<Option<u32>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(found) => Ok(found.map(|l| l.header.index)),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}

async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, EgressError> {
    link_index(handle, name).await.map_err(nl("find a link"))
}

/// Removes the root side `name` (and so its pair) if it exists.
async fn remove(handle: &Handle, name: &str) -> Result<(), EgressError> {
    if let Some(index) = index_of(handle, name).await? {
        match handle.link().del(index).execute().await {
            // Gone meanwhile, with its namespace.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            other => other.map_err(nl("delete an old veth"))?,
        }
    }
    Ok(())
}

/// A root-side name no link has; deletes the older pair if both are taken.
async fn free_name(handle: &Handle) -> Result<&'static str, EgressError> {
    for name in ROOT_LINKS {
        if index_of(handle, name).await?.is_none() {
            return Ok(name);
        }
    }
    remove(handle, ROOT_LINKS[0]).await?;
    Ok(ROOT_LINKS[0])
}

/// Deletes the root side `name` of an old container's pair (its namespace
/// takes the pair along when it goes, but that can be much later: open
/// sockets in it keep it alive). Errors are logged.
pub async fn remove_link(name: &'static str) {
    let removed = match connect() {
        Ok(root) => remove(&root, name).await,
        Err(e) => Err(e),
    };
    if let Err(err) = removed {
        tracing::warn!(%err, link = name, "an old container's veth stays");
    }
}

/// The masquerade rules, replacing any earlier ones.
fn ruleset(egress: &Egress) -> String {
    let net = u32::from(egress.inner_addr) & (u32::MAX << (32 - u32::from(egress.prefix_len)));
    let net = Ipv4Addr::from(net);
    format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\n\
         table ip {TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         ip saddr {net}/{} oifname != \"{ROOT_LINK_PATTERN}\" masquerade\n  }}\n}}\n",
        egress.prefix_len
    )
}

async fn nft(script: &str) -> Result<(), EgressError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("run nft (install nftables)"))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(script.as_bytes())
        .await
        .map_err(io("write to nft"))?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(io("wait for nft"))?;
    if !out.status.success() {
        return Err(EgressError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// Gives the container whose network namespace is `netns` (PID 1 = `pid1`)
/// its way out. Idempotent: what an earlier run left is replaced. The
/// forwarding switch and the masquerade rule do not depend on the link, so
/// a rebuilt container skips them (`with_rules` false). Returns the root
/// side's name, for [`remove_link`] when the container goes.
///
/// # Errors
/// [`EgressError`] naming the step.
pub async fn set_up(
    egress: &Egress,
    pid1: u32,
    netns: &Path,
    with_rules: bool,
) -> Result<&'static str, EgressError> {
    let root = connect()?;
    let name = free_name(&root).await?;
    // The peer is born inside the container as eth0: moving an interface
    // between namespaces unregisters it, and that waits for RCU grace
    // periods (~40 ms here) — most of what a bounce would spend on egress.
    let peer = LinkUnspec::new_with_name("eth0").setns_by_pid(pid1).build();
    root.link()
        .add(
            LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(name.to_owned())
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build(),
        )
        .execute()
        .await
        .map_err(nl("create the veth pair, its peer in the container"))?;
    let index = index_of(&root, name).await?.unwrap_or_default();
    root.address()
        .add(index, IpAddr::V4(egress.root_addr), 32)
        .execute()
        .await
        .map_err(nl("address the root side"))?;
    root.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("bring the root side up"))?;
    root.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(egress.inner_addr, 32)
                .output_interface(index)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(nl("route to the container"))?;

    let inner = connect_in(netns).await?;
    let eth0 = index_of(&inner, "eth0").await?.unwrap_or_default();
    inner
        .address()
        .add(eth0, IpAddr::V4(egress.inner_addr), egress.prefix_len)
        .execute()
        .await
        .map_err(nl("address the container's eth0"))?;
    inner
        .link()
        .set(LinkUnspec::new_with_index(eth0).up().build())
        .execute()
        .await
        .map_err(nl("bring the container's eth0 up"))?;
    inner
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(egress.root_addr)
                .build(),
        )
        .execute()
        .await
        .map_err(nl("the container's default route"))?;

    if with_rules {
        tokio::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .await
            .map_err(io("enable IPv4 forwarding"))?;
        nft(&ruleset(egress)).await?;
    }
    Ok(name)
}

/// Removes the masquerade rules and the root side of the pair (gone with
/// the container's namespace anyway).
pub async fn tear_down() {
    if let Ok(root) = connect() {
        for name in ROOT_LINKS {
            let _ = remove(&root, name).await;
        }
    }
    let _ = nft(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n")).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masquerades_the_container_subnet_only() {
        let rules = ruleset(&Egress::default());
        assert!(
            rules.contains("ip saddr 10.88.0.0/30 oifname != \"nb-inner*\" masquerade"),
            "{rules}"
        );
        assert!(rules.starts_with("table ip nestbox\ndelete table ip nestbox\n"));
    }
}
