/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The one record the kernel side of nestbox hands to userspace.
 *
 * The Rust mirror is `nestbox_ebpf::RawEvent`; a test in that crate compiles
 * this header with the host C compiler and checks size and field offsets, so
 * keep the two in step (append fields, keep natural alignment).
 */
#ifndef NESTBOX_EVENTS_H
#define NESTBOX_EVENTS_H

#include <linux/types.h>

/* What happened to a listening socket. */
enum nb_event_kind {
	NB_EVENT_LISTEN = 1,
	NB_EVENT_CLOSE = 2,
};

/* Which hook saw it. */
enum nb_event_source {
	NB_SRC_LISTEN_CB = 1,    /* sockops BPF_SOCK_OPS_TCP_LISTEN_CB */
	NB_SRC_STATE_CB = 2,     /* sockops BPF_SOCK_OPS_STATE_CB, LISTEN -> CLOSE */
	NB_SRC_SOCK_RELEASE = 3, /* cgroup/sock_release backstop */
};

struct nb_event {
	__u64 socket_cookie;  /* bpf_get_socket_cookie(): same as inet_diag's idiag_cookie */
	__u64 netns_cookie;   /* bpf_get_netns_cookie(): same as SO_NETNS_COOKIE */
	__u64 cgroup_id;      /* cgroup v2 id (inode of the cgroup directory) */
	__u64 ktime_ns;       /* bpf_ktime_get_ns(), CLOCK_MONOTONIC */
	__u32 tgid;           /* process id (0 when no process context) */
	__u32 pid;            /* thread id */
	__u32 addr[4];        /* local address, network byte order; IPv4 in addr[0] */
	__u16 port;           /* local port, host byte order */
	__u16 family;         /* AF_INET or AF_INET6 */
	__u8 kind;            /* enum nb_event_kind */
	__u8 source;          /* enum nb_event_source */
	__u8 _pad[2];
	char comm[16];        /* task comm of the caller */
};

/*
 * What is remembered per listening socket: by the listen callback in
 * socket-local storage, and by userspace in the `reconciled` map for sockets
 * that listened before the programs were attached. Rust mirror:
 * `nestbox_ebpf::RawListener`.
 */
struct nb_listener {
	__u32 addr[4];
	__u16 port;
	__u16 family;
	__u32 _pad;
	__u64 netns_cookie;
};

#endif
