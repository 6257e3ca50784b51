/*
 * PID 1 of the inner container once it is built: reaps orphans, nothing
 * else. `nestbox-guest container-init` builds the container's root and then
 * executes this program in its place, so that the process that lives as
 * long as the container costs a few KiB instead of the guest binary's
 * runtime (its text, libc and heap: about 2 MiB resident).
 *
 * No libc: raw x86-64 system calls, so the static binary is a few KiB and
 * needs nothing from the container's root (it runs from a memfd).
 *
 * Every signal is blocked. wait4() sleeps while there are children; with
 * none (services are the guest's children; only orphans are reparented
 * here), rt_sigtimedwait() sleeps until SIGCHLD says an adopted orphan
 * ended. SIGKILL (cgroup.kill) ends the container.
 */

#if !defined(__x86_64__)
#error "the container reaper is written for x86-64"
#endif

#define SYS_rt_sigprocmask 14
#define SYS_wait4 61
#define SYS_rt_sigtimedwait 128
#define SYS_prctl 157
#define PR_SET_NAME 15
#define SIG_BLOCK 0
#define SIGCHLD 17
#define ECHILD 10

static long sys4(long n, long a, long b, long c, long d)
{
	long ret;
	register long r10 __asm__("r10") = d;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return ret;
}

void _start(void)
{
	unsigned long all = ~0UL;
	unsigned long chld = 1UL << (SIGCHLD - 1);

	/* What ps shows (an exec from a memfd would be named by its fd). */
	sys4(SYS_prctl, PR_SET_NAME, (long)"nestbox-reaper", 0, 0);
	sys4(SYS_rt_sigprocmask, SIG_BLOCK, (long)&all, 0, sizeof(all));
	for (;;) {
		if (sys4(SYS_wait4, -1, 0, 0, 0) == -ECHILD)
			sys4(SYS_rt_sigtimedwait, (long)&chld, 0, 0, sizeof(chld));
	}
}
