//! The inner container's way out: a veth pair made with rtnetlink (the
//! root side keeps `root_addr`, the other end is moved into the container as
//! `eth0` with `inner_addr` and a default route through the root side), IP
//! forwarding, and an nftables masquerade rule so that user code reaches the
//! network with the VM's address. Nothing comes in this way: the ingress
//! dials inside the container's namespace instead.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Stdio;

use futures_util::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

/// The root side's interface name.
pub const ROOT_LINK: &str = "nb-inner0";
/// The container side's name until it is inside (the VM has an `eth0`).
const PEER_LINK: &str = "nb-inner1";
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

/// A netlink connection whose socket lives in the namespace at `netns`.
fn connect_in(netns: &Path) -> Result<Handle, EgressError> {
    let runtime = tokio::runtime::Handle::current();
    let made = crate::netns::run_in(Some(netns), move || {
        let _entered = runtime.enter();
        rtnetlink::new_connection()
    })
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

/// Removes the root side (and so the pair) if it is left from before.
async fn remove_stale(handle: &Handle) -> Result<(), EgressError> {
    if let Some(index) = index_of(handle, ROOT_LINK).await? {
        handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl("delete the old veth"))?;
    }
    Ok(())
}

/// The masquerade rules, replacing any earlier ones.
fn ruleset(egress: &Egress) -> String {
    let net = u32::from(egress.inner_addr) & (u32::MAX << (32 - u32::from(egress.prefix_len)));
    let net = Ipv4Addr::from(net);
    format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\n\
         table ip {TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         ip saddr {net}/{} oifname != \"{ROOT_LINK}\" masquerade\n  }}\n}}\n",
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
/// a rebuilt container skips them (`with_rules` false).
///
/// # Errors
/// [`EgressError`] naming the step.
pub async fn set_up(
    egress: &Egress,
    pid1: u32,
    netns: &Path,
    with_rules: bool,
) -> Result<(), EgressError> {
    let root = connect()?;
    remove_stale(&root).await?;
    root.link()
        .add(LinkVeth::new(ROOT_LINK, PEER_LINK).build())
        .execute()
        .await
        .map_err(nl("create the veth pair"))?;
    let peer = index_of(&root, PEER_LINK)
        .await?
        .ok_or_else(|| EgressError::Io {
            what: "find the new veth's peer",
            source: std::io::ErrorKind::NotFound.into(),
        })?;
    root.link()
        .set(LinkUnspec::new_with_index(peer).setns_by_pid(pid1).build())
        .execute()
        .await
        .map_err(nl("move the peer into the container"))?;
    let index = index_of(&root, ROOT_LINK).await?.unwrap_or_default();
    root.address()
        .add(index, IpAddr::V4(egress.root_addr), egress.prefix_len)
        .execute()
        .await
        .map_err(nl("address the root side"))?;
    root.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("bring the root side up"))?;

    let inner = connect_in(netns)?;
    let eth0 = index_of(&inner, PEER_LINK).await?.unwrap_or_default();
    inner
        .link()
        .set(LinkUnspec::new_with_index(eth0).name("eth0").build())
        .execute()
        .await
        .map_err(nl("name the container's interface eth0"))?;
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

    if !with_rules {
        return Ok(());
    }
    tokio::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .await
        .map_err(io("enable IPv4 forwarding"))?;
    nft(&ruleset(egress)).await
}

/// Removes the masquerade rules and the root side of the pair (gone with
/// the container's namespace anyway).
pub async fn tear_down() {
    if let Ok(root) = connect() {
        let _ = remove_stale(&root).await;
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
            rules.contains("ip saddr 10.88.0.0/30 oifname != \"nb-inner0\" masquerade"),
            "{rules}"
        );
        assert!(rules.starts_with("table ip nestbox\ndelete table ip nestbox\n"));
    }
}
