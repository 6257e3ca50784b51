// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * portwatch: tell userspace when a process of the inner container starts or
 * stops listening on a TCP port.
 *
 * - sockops, BPF_SOCK_OPS_TCP_LISTEN_CB: fires in listen() for every bound or
 *   autobound socket (post_bind hooks miss autobind). It records the listener
 *   in socket-local storage, reports it, and asks for state callbacks.
 * - sockops, BPF_SOCK_OPS_STATE_CB: LISTEN -> CLOSE (close(), shutdown(), or
 *   the process dying) reports the close and forgets the socket.
 * - cgroup/sock_release: the backstop. It cannot read the port from its
 *   context, so it reports only sockets whose storage is still there, with
 *   the port remembered at listen time (STATE_CB deletes the storage of
 *   the sockets it has reported).
 * - `reconciled`: sockets that were listening before the programs were
 *   attached have no storage and no state callbacks. Userspace finds them
 *   through sock_diag and enters them here by cookie, so that sock_release
 *   reports their close too.
 *
 * Every record goes through one ring buffer. A failed reservation is counted
 * in `dropped` so that userspace knows to reconcile.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "events.h"

#define AF_INET 2
#define AF_INET6 10
#define TCP_LISTEN 10
#define TCP_CLOSE 7

/*
 * Read a context field into a register *here*. Without the barrier clang
 * sinks the loads into the branches below and merges them into one load
 * through an offset ctx pointer, which the verifier rejects ("dereference of
 * modified ctx ptr").
 */
#define CTX_LOAD(field)                                  \
	({                                               \
		__u32 __v = (field);                     \
		asm volatile("" : "+r"(__v));            \
		__v;                                     \
	})

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct nb_listener);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, struct nb_listener);
} reconciled SEC(".maps");

/* Records that did not fit in the ring buffer: index 0. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} dropped SEC(".maps");

static __always_inline void count_drop(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&dropped, &zero);

	if (n)
		__sync_fetch_and_add(n, 1);
}

/*
 * Whether the task helpers (pid, comm, cgroup id) may be called. Sockops
 * programs got them only in later kernels (Debian's 6.1 VM kernel says
 * "unknown func bpf_get_current_pid_tgid"): the loader clears this
 * read-only global there, the verifier then never visits the calls, and
 * userspace finds the owner of the socket itself.
 */
const volatile __u8 nb_task_helpers = 1;

static __always_inline void fill_task(struct nb_event *e)
{
	e->ktime_ns = bpf_ktime_get_ns();
	if (!nb_task_helpers) {
		e->tgid = 0;
		e->pid = 0;
		e->cgroup_id = 0;
		__builtin_memset(e->comm, 0, sizeof(e->comm));
		return;
	}
	__u64 id = bpf_get_current_pid_tgid();

	e->tgid = id >> 32;
	e->pid = (__u32)id;
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

static __always_inline void emit(const struct nb_listener *l, __u64 cookie,
				 __u8 kind, __u8 source)
{
	struct nb_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		count_drop();
		return;
	}
	e->socket_cookie = cookie;
	e->netns_cookie = l->netns_cookie;
	e->addr[0] = l->addr[0];
	e->addr[1] = l->addr[1];
	e->addr[2] = l->addr[2];
	e->addr[3] = l->addr[3];
	e->port = l->port;
	e->family = l->family;
	e->kind = kind;
	e->source = source;
	e->_pad[0] = 0;
	e->_pad[1] = 0;
	fill_task(e);
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void on_listen(struct bpf_sock_ops *skops)
{
	struct nb_listener l = {};
	struct nb_listener *stored;
	struct bpf_sock *sk = skops->sk;
	__u32 family = skops->family;
	__u32 ip4 = CTX_LOAD(skops->local_ip4);
	__u32 ip6_0 = CTX_LOAD(skops->local_ip6[0]);
	__u32 ip6_1 = CTX_LOAD(skops->local_ip6[1]);
	__u32 ip6_2 = CTX_LOAD(skops->local_ip6[2]);
	__u32 ip6_3 = CTX_LOAD(skops->local_ip6[3]);

	if (family == AF_INET) {
		l.addr[0] = ip4;
	} else if (family == AF_INET6) {
		l.addr[0] = ip6_0;
		l.addr[1] = ip6_1;
		l.addr[2] = ip6_2;
		l.addr[3] = ip6_3;
	} else {
		return;
	}
	l.family = family;
	l.port = skops->local_port;
	l.netns_cookie = bpf_get_netns_cookie(skops);

	if (sk) {
		stored = bpf_sk_storage_get(&listeners, sk, 0,
					    BPF_SK_STORAGE_GET_F_CREATE);
		if (stored)
			*stored = l;
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						 BPF_SOCK_OPS_STATE_CB_FLAG);
	emit(&l, bpf_get_socket_cookie(skops), NB_EVENT_LISTEN,
	     NB_SRC_LISTEN_CB);
}

static __always_inline void on_state(struct bpf_sock_ops *skops)
{
	struct nb_listener *stored;
	struct bpf_sock *sk = skops->sk;
	__u32 old_state = skops->args[0];
	__u32 new_state = skops->args[1];

	if (old_state != TCP_LISTEN || new_state != TCP_CLOSE || !sk)
		return;
	stored = bpf_sk_storage_get(&listeners, sk, 0, 0);
	if (!stored)
		return;
	emit(stored, bpf_get_socket_cookie(skops), NB_EVENT_CLOSE,
	     NB_SRC_STATE_CB);
	/* Reported: sock_release must stay quiet for this one. */
	bpf_sk_storage_delete(&listeners, sk);
}

SEC("sockops")
int nb_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		on_listen(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		on_state(skops);
		break;
	}
	return 1;
}

SEC("cgroup/sock_release")
int nb_sock_release(struct bpf_sock *sk)
{
	struct nb_listener *stored;
	__u64 cookie;

	if (sk->protocol != 6 /* IPPROTO_TCP */)
		return 1;
	cookie = bpf_get_socket_cookie(sk);
	stored = bpf_sk_storage_get(&listeners, sk, 0, 0);
	if (stored) {
		/* sock_release may not delete storage; it goes with the socket. */
		emit(stored, cookie, NB_EVENT_CLOSE, NB_SRC_SOCK_RELEASE);
		return 1;
	}
	stored = bpf_map_lookup_elem(&reconciled, &cookie);
	if (stored) {
		emit(stored, cookie, NB_EVENT_CLOSE, NB_SRC_SOCK_RELEASE);
		bpf_map_delete_elem(&reconciled, &cookie);
	}
	return 1;
}
