//! rtnetlink verbs for a VM's tap, each one request, traced, and
//! idempotent where setup may be repeated (an address or route that is
//! already there is replaced; deleting what is gone succeeds).
//!
//! rtnetlink is async; the launcher is a short-lived command, so a
//! [`Netlink`] carries its own current-thread tokio runtime and each verb
//! blocks on one request. Do not call it from inside a tokio runtime.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::NetError;

/// A netlink route socket and the runtime that drives it.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

fn failed(what: &'static str, iface: &str) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let iface = iface.to_owned();
    move |source| NetError::Netlink {
        what,
        iface,
        source,
    }
}

/// Whether `err` is the kernel's `-code`.
fn is_errno(err: &rtnetlink::Error, code: i32) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(e) if e.raw_code() == -code)
}

impl Netlink {
    /// Opens the socket.
    ///
    /// # Errors
    /// [`NetError::Socket`].
    pub fn connect() -> Result<Self, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetError::Socket)?;
        let (conn, handle, _) = {
            let _entered = rt.enter();
            rtnetlink::new_connection().map_err(NetError::Socket)?
        };
        rt.spawn(conn);
        Ok(Self { rt, handle })
    }

    /// The index of link `name`, if it exists.
    ///
    /// # Errors
    /// [`NetError::Netlink`].
    pub fn link_index(&self, name: &str) -> Result<Option<u32>, NetError> {
        let found = self.rt.block_on(async {
            let mut links = self
                .handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute();
            links.try_next().await
        });
        match found {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(failed("find the link", name)(e)),
        }
    }

    /// Puts `addr/prefix_len` on link `index` (replacing it if present).
    ///
    /// # Errors
    /// [`NetError::Netlink`].
    pub fn add_addr(
        &self,
        iface: &str,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        tracing::debug!(%iface, %addr, prefix_len, "add address");
        self.rt
            .block_on(
                self.handle
                    .address()
                    .add(index, IpAddr::V4(addr), prefix_len)
                    .replace()
                    .execute(),
            )
            .map_err(failed("add the host address", iface))
    }

    /// Sets link `index` up.
    ///
    /// # Errors
    /// [`NetError::Netlink`].
    pub fn set_up(&self, iface: &str, index: u32) -> Result<(), NetError> {
        tracing::debug!(%iface, "set up");
        self.rt
            .block_on(
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute(),
            )
            .map_err(failed("set the link up", iface))
    }

    fn host_route(index: u32, dest: Ipv4Addr) -> RouteMessageBuilder<Ipv4Addr> {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
    }

    /// Routes `dest/32` out of link `index`, from `src` (replacing a route
    /// to `dest` that is there).
    ///
    /// # Errors
    /// [`NetError::Netlink`].
    pub fn add_route(
        &self,
        iface: &str,
        index: u32,
        dest: Ipv4Addr,
        src: Ipv4Addr,
    ) -> Result<(), NetError> {
        tracing::debug!(%iface, %dest, %src, "add route");
        let route = Self::host_route(index, dest).pref_source(src).build();
        self.rt
            .block_on(self.handle.route().add(route).replace().execute())
            .map_err(failed("add the route to the guest", iface))
    }

    /// Removes the route to `dest/32` out of link `index`; none there is
    /// fine.
    ///
    /// # Errors
    /// [`NetError::Netlink`].
    pub fn del_route(&self, iface: &str, index: u32, dest: Ipv4Addr) -> Result<(), NetError> {
        tracing::debug!(%iface, %dest, "delete route");
        let route = Self::host_route(index, dest).build();
        match self.rt.block_on(self.handle.route().del(route).execute()) {
            Err(e) if is_errno(&e, libc::ESRCH) || is_errno(&e, libc::ENODEV) => Ok(()),
            other => other.map_err(failed("delete the route to the guest", iface)),
        }
    }

    /// Deletes link `index`; a link already gone is fine.
    ///
    /// # Errors
    /// [`NetError::Netlink`].
    pub fn del_link(&self, iface: &str, index: u32) -> Result<(), NetError> {
        tracing::debug!(%iface, "delete link");
        match self.rt.block_on(self.handle.link().del(index).execute()) {
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            other => other.map_err(failed("delete the link", iface)),
        }
    }
}
