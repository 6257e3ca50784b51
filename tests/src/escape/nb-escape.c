/*
 * nb-escape: the escape suite's attacker, run by a test *inside the inner
 * container of a real VM* (never on the CI machine: a success here would
 * change the machine it runs on). Static, libc only, so that it runs in the
 * container's busybox root; the test serves it over HTTP from an
 * allow-listed address and the container fetches it with wget, as a user
 * would bring a tool in.
 *
 * Besides the attempts, modes for the resource tests and benchmarks:
 * `serve PORT` (a web app that never forks), `headers PORT` (a web app
 * that answers with the request's head), `echo PORT` (a loopback echo
 * server), `syscalls N` (the cost of a
 * system call, with or without the container's seccomp filter), `lines
 * RATE` (writes RATE numbered log lines a second to stdout, for ever) and
 * `exit` (exits at once: a program to start, for the spawn benchmark).
 *
 * Each attempt prints one line:
 *   RESULT <attempt> blocked <errno name>   the kernel said no
 *   RESULT <attempt> ESCAPED <what worked>  the boundary did not hold
 * and the program exits 0 either way: the test reads the lines.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <linux/reboot.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/swap.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <poll.h>
#include <arpa/inet.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

static int blocked(const char *what, long rc)
{
	if (rc >= 0)
		return 0;
	printf("RESULT %s blocked %s\n", what, strerrorname_np(errno) ? strerrorname_np(errno) : "?");
	return 1;
}

static void escaped(const char *what, const char *detail)
{
	printf("RESULT %s ESCAPED %s\n", what, detail);
}

/* One attempt: the call, and what it means if it works. */
#define TRY(what, call, detail)                       \
	do {                                          \
		errno = 0;                            \
		long rc_ = (long)(call);              \
		if (!blocked(what, rc_))              \
			escaped(what, detail);        \
	} while (0)

static void bpf_attempts(void)
{
	/* BPF_PROG_LOAD of "r0 = 0; exit" as a socket filter. */
	struct bpf_insn insns[] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	union bpf_attr attr;
	memset(&attr, 0, sizeof(attr));
	attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
	attr.insns = (unsigned long)insns;
	attr.insn_cnt = 2;
	attr.license = (unsigned long)"GPL";
	TRY("bpf-prog-load", syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof(attr)),
	    "loaded a BPF program");
	memset(&attr, 0, sizeof(attr));
	attr.map_type = BPF_MAP_TYPE_ARRAY;
	attr.key_size = 4;
	attr.value_size = 4;
	attr.max_entries = 1;
	TRY("bpf-map-create", syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof(attr)),
	    "created a BPF map");
}

static void perf_attempts(void)
{
	struct perf_event_attr pe;
	memset(&pe, 0, sizeof(pe));
	pe.size = sizeof(pe);
	pe.type = PERF_TYPE_SOFTWARE;
	pe.config = PERF_COUNT_SW_CPU_CLOCK;
	pe.disabled = 1;
	TRY("perf-event-open-self", syscall(SYS_perf_event_open, &pe, 0, -1, -1, 0),
	    "opened a perf event on itself");
	/* All processes on CPU 0: what a profiler of the whole VM would do. */
	TRY("perf-event-open-cpu", syscall(SYS_perf_event_open, &pe, -1, 0, -1, 0),
	    "opened a perf event on a whole CPU");
}

/* Makes a block device node for the VM's first virtio disk (253:0, and
 * 254:0 on kernels that number virtio-blk there) and reads its first block. */
static void mknod_attempts(void)
{
	static const int majors[] = { 253, 254 };
	for (unsigned i = 0; i < sizeof(majors) / sizeof(majors[0]); i++) {
		char path[64];
		snprintf(path, sizeof(path), "/tmp/nb-disk-%d", majors[i]);
		unlink(path);
		errno = 0;
		if (blocked("mknod-block", mknod(path, S_IFBLK | 0600, makedev(majors[i], 0))))
			continue;
		int fd = open(path, O_RDONLY);
		if (blocked("open-block-device", fd))
			continue;
		char block[512];
		if (blocked("read-block-device", read(fd, block, sizeof(block))))
			continue;
		escaped("read-block-device", "read a VM disk's first block");
	}
}

static void module_attempts(void)
{
	int fd = open("/bin/busybox", O_RDONLY);
	TRY("finit-module", syscall(SYS_finit_module, fd, "", 0), "loaded a kernel module");
	TRY("init-module", syscall(SYS_init_module, "x", 1, ""), "loaded a kernel module");
	TRY("delete-module", syscall(SYS_delete_module, "virtio_net", O_NONBLOCK),
	    "unloaded a kernel module");
	TRY("kexec-load", syscall(SYS_kexec_load, 0, 0, NULL, 0), "loaded a kernel to kexec");
}

static void keyring_attempts(void)
{
	/* KEY_SPEC_PROCESS_KEYRING = -2 */
	TRY("add-key", syscall(SYS_add_key, "user", "nb", "secret", 6, -2),
	    "added a key to a kernel keyring");
	/* KEYCTL_GET_KEYRING_ID = 0, KEY_SPEC_USER_KEYRING = -4 */
	TRY("keyctl", syscall(SYS_keyctl, 0, -4, 0), "reached the kernel keyring");
	TRY("request-key", syscall(SYS_request_key, "user", "nb", NULL, 0),
	    "asked the kernel keyring for a key");
}

static void hardware_attempts(void)
{
	TRY("iopl", iopl(3), "raised its I/O privilege level");
	TRY("ioperm", ioperm(0x3f8, 8, 1), "got access to the serial port's I/O ports");
	/* Toggling Ctrl-Alt-Del: harmless if it works, but it needs CAP_SYS_BOOT. */
	TRY("reboot", syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
			      LINUX_REBOOT_CMD_CAD_OFF, NULL),
	    "may reboot the VM");
	int fd = open("/tmp/nb-swap", O_CREAT | O_WRONLY, 0600);
	if (fd >= 0)
		close(fd);
	TRY("swapon", swapon("/tmp/nb-swap", 0), "turned swap on");
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	TRY("clock-settime", clock_settime(CLOCK_REALTIME, &now), "set the VM's clock");
	struct timeval tv = { .tv_sec = now.tv_sec };
	TRY("settimeofday", settimeofday(&tv, NULL), "set the VM's clock");
}

/* New namespaces to regain privileges, and joining PID 1's. */
static void namespace_attempts(void)
{
	TRY("unshare-user", unshare(CLONE_NEWUSER), "made a user namespace (full capabilities in it)");
	TRY("unshare-mount", unshare(CLONE_NEWNS), "made a mount namespace");
	TRY("unshare-net", unshare(CLONE_NEWNET), "made a network namespace");
	errno = 0;
	long child = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
	if (child == 0)
		_exit(0);
	if (!blocked("clone-newuser", child))
		escaped("clone-newuser", "cloned into a user namespace");
	static const char *kinds[] = { "mnt", "net", "pid", "user", "cgroup", "uts", "ipc" };
	for (unsigned i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
		char path[64], what[64];
		snprintf(path, sizeof(path), "/proc/1/ns/%s", kinds[i]);
		snprintf(what, sizeof(what), "setns-pid1-%s", kinds[i]);
		int fd = open(path, O_RDONLY);
		if (blocked(what, fd))
			continue;
		TRY(what, setns(fd, 0), "joined a namespace of the container's PID 1");
		close(fd);
	}
	TRY("mount-tmpfs", mount("x", "/mnt", "tmpfs", 0, NULL), "mounted a tmpfs");
	TRY("mount-proc", mount("proc", "/mnt", "proc", 0, NULL), "mounted a fresh proc");
	TRY("mount-sysfs", mount("sysfs", "/mnt", "sysfs", 0, NULL), "mounted sysfs");
	TRY("mount-cgroup2", mount("cgroup2", "/mnt", "cgroup2", 0, NULL), "mounted cgroup2");
	TRY("umount-proc-sys", umount2("/proc/sys", MNT_DETACH), "unmounted the read-only /proc/sys");
	TRY("remount-proc-sys-rw", mount(NULL, "/proc/sys", NULL, MS_REMOUNT | MS_BIND, NULL),
	    "made /proc/sys writable");
}

/* The VM's API on its Unix socket, without the token. */
static void api_socket_attempt(void)
{
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	strcpy(addr.sun_path, "/.nestbox/api.sock");
	if (connect(s, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
		printf("RESULT api-socket-no-token unreachable %s\n", strerrorname_np(errno));
		return;
	}
	const char *req = "GET /v1/status HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n";
	if (write(s, req, strlen(req)) < 0)
		return;
	char reply[256] = { 0 };
	ssize_t n = read(s, reply, sizeof(reply) - 1);
	char *eol = n > 0 ? strstr(reply, "\r\n") : NULL;
	if (eol)
		*eol = 0;
	printf("RESULT api-socket-no-token status %s\n", n > 0 ? reply : "(nothing)");
}

/*
 * `serve PORT`: the user's web app for the resource tests, one process that
 * never forks (busybox httpd forks per request, and a fork bomb in the same
 * container leaves no process to fork): answers every request with a fixed
 * page. Its accept queue is a production server's (busybox httpd's holds 9
 * connections: a burst of thousands overflows it, and the kernel drops
 * the overflow's ACKs until the client's retransmissions, up to a minute
 * later, find room).
 */
static int serve(int port)
{
	int s = socket(AF_INET6, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in6 addr = { .sin6_family = AF_INET6, .sin6_port = htons(port) };
	if (bind(s, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(s, 4096) != 0) {
		perror("nb-escape serve");
		return 1;
	}
	printf("serving on %d\n", port);
	static const char page[] = "HTTP/1.1 200 OK\r\nContent-Length: 19\r\nConnection: close\r\n\r\n"
				   "hello from nestbox\n";
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0)
			continue;
		char req[2048];
		ssize_t n = read(c, req, sizeof(req));
		if (n > 0 && write(c, page, sizeof(page) - 1) < 0)
			perror("nb-escape serve: write");
		close(c);
	}
}

/*
 * `echo PORT`: an echo server on the container's loopback only (127.0.0.1),
 * for the tunnel tests: one process, poll(2) over every client, each byte
 * read written back.
 */
static int echo(int port)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port),
				    .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	if (bind(s, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(s, 4096) != 0) {
		perror("nb-escape echo");
		return 1;
	}
	printf("echoing on 127.0.0.1:%d\n", port);
	enum { MAX = 1024 };
	static struct pollfd fds[MAX];
	int n = 1;
	fds[0] = (struct pollfd){ .fd = s, .events = POLLIN };
	for (;;) {
		if (poll(fds, n, -1) < 0)
			continue;
		if ((fds[0].revents & POLLIN) && n < MAX) {
			int c = accept(s, NULL, NULL);
			if (c >= 0)
				fds[n++] = (struct pollfd){ .fd = c, .events = POLLIN };
		}
		for (int i = 1; i < n; i++) {
			if (!fds[i].revents)
				continue;
			char buf[65536];
			ssize_t r = read(fds[i].fd, buf, sizeof buf);
			ssize_t off = 0;
			while (r > 0 && off < r) {
				ssize_t w = write(fds[i].fd, buf + off, (size_t)(r - off));
				if (w <= 0)
					break;
				off += w;
			}
			if (r <= 0 || off < r) {
				close(fds[i].fd);
				fds[i--] = fds[--n];
			}
		}
	}
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t w = write(fd, buf, len);
		if (w <= 0)
			return -1;
		buf += w;
		len -= (size_t)w;
	}
	return 0;
}

/*
 * `headers PORT`: answers every request with its own head (the request
 * line and the headers, as they arrived) as the body: the app that shows
 * what the ingress forwards. A WebSocket upgrade is answered 101, then the
 * head as the first bytes of the upgraded stream, then the end.
 */
static int headers(int port)
{
	int s = socket(AF_INET6, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in6 addr = { .sin6_family = AF_INET6, .sin6_port = htons(port) };
	if (bind(s, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(s, 64) != 0) {
		perror("nb-escape headers");
		return 1;
	}
	printf("showing request heads on %d\n", port);
	fflush(stdout);
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0)
			continue;
		static char req[16384];
		size_t n = 0;
		req[0] = 0;
		while (n < sizeof(req) - 1 && !strstr(req, "\r\n\r\n")) {
			ssize_t r = read(c, req + n, sizeof(req) - 1 - n);
			if (r <= 0)
				break;
			n += (size_t)r;
			req[n] = 0;
		}
		char *end = strstr(req, "\r\n\r\n");
		size_t len = end ? (size_t)(end - req) + 4 : n;
		char head[256];
		int hl;
		if (strcasestr(req, "\r\nupgrade: websocket"))
			hl = snprintf(head, sizeof(head),
				      "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
				      "Upgrade: websocket\r\n\r\n");
		else
			hl = snprintf(head, sizeof(head),
				      "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
				      "Content-Length: %zu\r\nConnection: close\r\n\r\n",
				      len);
		if (write_all(c, head, (size_t)hl) != 0 || write_all(c, req, len) != 0)
			perror("nb-escape headers: write");
		close(c);
	}
}

static double now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

/*
 * `syscalls N`: the cost of a system call, for the seccomp benchmark. Two
 * loops: getppid, whose verdict the filter gives whatever its arguments
 * (the kernel caches such verdicts), and socket + close, where the filter
 * looks at socket's family. Prints the ns per call of each.
 */
static int syscalls(long n)
{
	double t0 = now_ns();
	for (long i = 0; i < n; i++)
		syscall(SYS_getppid);
	double t1 = now_ns();
	long m = n / 10;
	for (long i = 0; i < m; i++)
		close(socket(AF_UNIX, SOCK_DGRAM, 0));
	double t2 = now_ns();
	printf("SYSCALLS getppid %.1f socket+close %.1f\n", (t1 - t0) / (double)n, (t2 - t1) / (double)m);
	return 0;
}

/*
 * `lines RATE`: RATE lines a second, written in a batch every 10 ms (one
 * write of many lines, as a busy server's logger does).
 */
static int lines(long rate)
{
	static char buf[1 << 20];
	long per_tick = rate / 100 > 0 ? rate / 100 : 1;
	unsigned long n = 0;
	double next = now_ns();
	for (;;) {
		size_t len = 0;
		for (long i = 0; i < per_tick && len < sizeof buf - 128; i++)
			len += (size_t)snprintf(buf + len, sizeof buf - len,
						"line %lu of a service that logs a lot\n", ++n);
		for (size_t off = 0; off < len;) {
			ssize_t w = write(1, buf + off, len - off);
			if (w <= 0)
				return 1;
			off += (size_t)w;
		}
		next += 10e6;
		double wait = next - now_ns();
		if (wait > 0) {
			struct timespec ts = { .tv_sec = 0, .tv_nsec = (long)wait };
			nanosleep(&ts, NULL);
		}
	}
}

int main(int argc, char **argv)
{
	const char *what = argc > 1 ? argv[1] : "all";
	if (!strcmp(what, "lines"))
		return lines(argc > 2 ? atol(argv[2]) : 100000);
	if (!strcmp(what, "exit"))
		return 0;
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(what, "serve"))
		return serve(argc > 2 ? atoi(argv[2]) : 8080);
	if (!strcmp(what, "headers"))
		return headers(argc > 2 ? atoi(argv[2]) : 8080);
	if (!strcmp(what, "echo"))
		return echo(argc > 2 ? atoi(argv[2]) : 3000);
	if (!strcmp(what, "syscalls"))
		return syscalls(argc > 2 ? atol(argv[2]) : 1000000);
	int all = strcmp(what, "all") == 0;
	if (all || !strcmp(what, "bpf"))
		bpf_attempts();
	if (all || !strcmp(what, "perf"))
		perf_attempts();
	if (all || !strcmp(what, "mknod"))
		mknod_attempts();
	if (all || !strcmp(what, "module"))
		module_attempts();
	if (all || !strcmp(what, "keyring"))
		keyring_attempts();
	if (all || !strcmp(what, "hardware"))
		hardware_attempts();
	if (all || !strcmp(what, "namespaces"))
		namespace_attempts();
	if (all || !strcmp(what, "api"))
		api_socket_attempt();
	printf("RESULT done\n");
	return 0;
}
