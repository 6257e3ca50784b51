//! The graveyard: what old builds of the inner container leave behind
//! (their network namespaces and veths), freed once bounces pause, off the
//! runtime thread.
#![deny(clippy::disallowed_methods)]

use std::sync::Arc;

use crate::container::egress;

/// Old containers' namespaces and veths, freed when bounces pause.
///
/// Destroying a network namespace and deleting a veth hold the kernel's
/// rtnl lock through RCU grace periods and burn tens of milliseconds of CPU
/// here: done right after a bounce they slow the new container on its way
/// to serving (and the next bounce). So they wait until no bounce has come
/// for [`Graveyard::QUIET`], then go together (the kernel tears dropped
/// namespaces down in one batch); at most [`Graveyard::MAX`] wait.
#[derive(Clone, Default)]
pub(crate) struct Graveyard {
    buried: Arc<parking_lot::Mutex<Vec<Remains>>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Graveyard {
    const QUIET: std::time::Duration = std::time::Duration::from_secs(2);
    const MAX: usize = 8;

    pub(crate) fn bury(&self, remains: Remains) {
        use std::sync::atomic::Ordering;
        let overflow = {
            let mut buried = self.buried.lock();
            buried.push(remains);
            (buried.len() > Self::MAX).then(|| buried.remove(0))
        };
        if let Some(oldest) = overflow {
            free_off_runtime(vec![oldest]);
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Self::QUIET).await;
            if this.generation.load(Ordering::SeqCst) == generation {
                free_off_runtime(this.take());
            }
        });
    }

    pub(crate) fn take(&self) -> Vec<Remains> {
        std::mem::take(&mut *self.buried.lock())
    }
}

/// Frees `remains`. Their namespaces go at once, all together (closing the
/// descriptors is cheap; the kernel tears the namespaces down in one batch
/// on its own worker). Their veths are deleted on a thread of their own:
/// deleting a veth runs inside the netlink `sendmsg` and holds it for the
/// kernel's RCU grace periods (tens of milliseconds), which on the guest's
/// single runtime thread would stall ingress and the port watcher with it.
/// Returns that thread, if one was needed.
pub(crate) fn free_off_runtime(remains: Vec<Remains>) -> Option<std::thread::JoinHandle<()>> {
    let (namespaces, links): (Vec<_>, Vec<_>) =
        remains.into_iter().map(|r| (r.netns, r.link)).unzip();
    drop(namespaces);
    let links: Vec<_> = links.into_iter().flatten().collect();
    if links.is_empty() {
        return None;
    }
    let stay = |err: &dyn std::fmt::Display| {
        tracing::warn!(%err, "old containers' veths stay until their namespaces go");
    };
    let freed = std::thread::Builder::new()
        .name("nestbox-graveyard".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(runtime) => runtime.block_on(async {
                    for link in links {
                        egress::remove_link(link).await;
                    }
                }),
                Err(err) => stay(&err),
            }
        });
    freed.inspect_err(|err| stay(err)).ok()
}

/// What a stopped container leaves to free once its successor serves.
pub(crate) struct Remains {
    /// Its network namespace, held open so the kernel does not tear it
    /// down yet.
    pub(crate) netns: Option<std::fs::File>,
    /// The root side of its veth pair.
    pub(crate) link: Option<&'static str>,
}
