//! The inner container's default seccomp filter, in the spirit of Docker's
//! and the OCI runtime's default profile: an allowlist of the system calls
//! ordinary programs make, everything else refused with `EPERM`.
//!
//! What it keeps out, on top of the user namespace (which already makes
//! most of these fail for lack of privilege): loading BPF programs and
//! opening perf events, kernel modules, `kexec`, the kernel keyring,
//! `iopl`/`ioperm`, swap, `reboot`, setting the clock, mounting and
//! pivoting roots, new namespaces (`unshare`, `setns`, `clone` with
//! `CLONE_NEW*`: a nested user namespace would give its creator every
//! capability over namespaces of its own, the classic kernel attack
//! surface), `io_uring` (its own large surface, refused by Docker since
//! 2023), `userfaultfd`, `open_by_handle_at`, `ptrace`-like access by pid
//! (`kcmp`, `pidfd_getfd`, `process_madvise`), NUMA policy, `syslog`,
//! quotas and accounting, and the obsolete calls nothing uses any more.
//!
//! Two filters are stacked; the kernel applies the strictest answer:
//! - the allowlist (anything not on it: `EPERM`); `clone` is allowed only
//!   without namespace flags, `personality` only for the personas
//!   programs really switch to, `socket` for every family but `AF_VSOCK`;
//! - `clone3` → `ENOSYS`: its flags sit in memory a filter cannot read,
//!   so it is refused in the way that makes C libraries fall back to
//!   `clone`, whose flags the allowlist checks.
//!
//! The filters are compiled once (`seccompiler`, Firecracker's compiler)
//! and installed by each process the guest starts in the container,
//! between `clone3` and `execve` (see [`crate::spawn`]). Allowed system
//! calls whose verdict does not depend on their arguments are cached by
//! the kernel (Linux ≥ 5.11), so they cost nothing at run time.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors compiling the filter (a bug in the tables below, never the
/// user's doing).
#[derive(Debug, thiserror::Error)]
#[error("the container's seccomp filter does not compile: {0}")]
pub struct SeccompError(String);

/// System calls allowed whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    // Files and directories.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_stat,
    libc::SYS_fstat,
    libc::SYS_lstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync,
    libc::SYS_syncfs,
    libc::SYS_sync_file_range,
    libc::SYS_truncate,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_readahead,
    libc::SYS_getdents,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_chdir,
    libc::SYS_fchdir,
    libc::SYS_chroot,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    // Device nodes fail in the user namespace; FIFOs and sockets need it.
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_lchown,
    libc::SYS_fchownat,
    libc::SYS_umask,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_utimensat,
    libc::SYS_futimesat,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    libc::SYS_name_to_handle_at,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_splice,
    libc::SYS_tee,
    libc::SYS_vmsplice,
    libc::SYS_ioctl,
    libc::SYS_inotify_init,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
    libc::SYS_fanotify_mark,
    libc::SYS_memfd_create,
    libc::SYS_memfd_secret,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    // Asynchronous I/O (the old interface; io_uring is refused).
    libc::SYS_io_setup,
    libc::SYS_io_destroy,
    libc::SYS_io_submit,
    libc::SYS_io_cancel,
    libc::SYS_io_getevents,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    // Waiting for events.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_ctl_old,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_wait_old,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    libc::SYS_signalfd,
    libc::SYS_signalfd4,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_msync,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_munlock,
    libc::SYS_mlockall,
    libc::SYS_munlockall,
    libc::SYS_remap_file_pages,
    libc::SYS_membarrier,
    libc::SYS_mseal,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_get_mempolicy,
    // Processes and threads.
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_tgkill,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_process_mrelease,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_gettid,
    libc::SYS_getpgid,
    libc::SYS_setpgid,
    libc::SYS_getpgrp,
    libc::SYS_getsid,
    libc::SYS_setsid,
    libc::SYS_set_tid_address,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_rseq,
    libc::SYS_arch_prctl,
    libc::SYS_set_thread_area,
    libc::SYS_get_thread_area,
    libc::SYS_prctl,
    libc::SYS_seccomp,
    libc::SYS_capget,
    libc::SYS_capset,
    // Debuggers and tracers inside the container (Linux ≥ 4.8 checks the
    // filter again after a tracer changes a system call).
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
    libc::SYS_getrlimit,
    libc::SYS_setrlimit,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_setparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getattr,
    libc::SYS_sched_setattr,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_getcpu,
    // Identity (ids are those of the container's user namespace).
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    // Signals.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sigaltstack,
    libc::SYS_pause,
    libc::SYS_restart_syscall,
    // Time (reading it, sleeping, timers; never setting the clock).
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_time,
    libc::SYS_times,
    libc::SYS_nanosleep,
    libc::SYS_alarm,
    libc::SYS_getitimer,
    libc::SYS_setitimer,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_gettime,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_delete,
    // Sockets.
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
    // System V and POSIX IPC (the container has its own IPC namespace).
    libc::SYS_shmget,
    libc::SYS_shmat,
    libc::SYS_shmdt,
    libc::SYS_shmctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_semctl,
    libc::SYS_msgget,
    libc::SYS_msgsnd,
    libc::SYS_msgrcv,
    libc::SYS_msgctl,
    libc::SYS_mq_open,
    libc::SYS_mq_unlink,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_notify,
    libc::SYS_mq_getsetattr,
    // About the system.
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrandom,
];

/// `clone` flags that make namespaces (`linux/sched.h`).
const NAMESPACE_FLAGS: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

/// `PER_LINUX` (`linux/personality.h`).
const PER_LINUX: u64 = 0;
/// `PER_LINUX32`: what `setarch linux32` sets.
const PER_LINUX32: u64 = 0x0008;
/// The argument that asks for the current persona without changing it.
const PERSONA_QUERY: u64 = 0xffff_ffff;

/// Personas programs switch to: Linux itself, 32-bit `uname`, a 2.6
/// version number (`UNAME26`), both, and the query. Flags such as
/// `ADDR_NO_RANDOMIZE` are refused.
const PERSONAS: [u64; 5] = [
    PER_LINUX,
    PER_LINUX32,
    UNAME26,
    PER_LINUX32 | UNAME26,
    PERSONA_QUERY,
];

/// `libc::UNAME26` as the filter compares it.
const UNAME26: u64 = libc::UNAME26.cast_unsigned() as u64;

/// `AF_VSOCK`, the one socket family refused.
const AF_VSOCK: u64 = libc::AF_VSOCK.cast_unsigned() as u64;

fn condition(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// The allowlist filter.
fn allowlist() -> Result<SeccompFilter, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|nr| (*nr, Vec::new())).collect();
    // clone(flags, …): no namespace flag set.
    let flags = u64::from(NAMESPACE_FLAGS.cast_unsigned());
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![condition(
            0,
            SeccompCmpOp::MaskedEq(flags),
            0,
        )?])?],
    );
    // clone3 is answered ENOSYS by the second filter; let this one pass it.
    rules.insert(libc::SYS_clone3, Vec::new());
    rules.insert(
        libc::SYS_personality,
        PERSONAS
            .iter()
            .map(|p| SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, *p)?]))
            .collect::<Result<_, _>>()?,
    );
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![condition(
            0,
            SeccompCmpOp::Ne,
            AF_VSOCK,
        )?])?],
    );
    SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM.cast_unsigned()),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
}

/// The `clone3` → `ENOSYS` filter.
fn no_clone3() -> Result<SeccompFilter, seccompiler::BackendError> {
    SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS.cast_unsigned()),
        TargetArch::x86_64,
    )
}

/// The compiled filters, in the order they are installed.
///
/// # Errors
/// [`SeccompError`] if a table above is wrong.
pub fn default_filters() -> Result<Vec<BpfProgram>, SeccompError> {
    let compile = |filter: Result<SeccompFilter, seccompiler::BackendError>| {
        filter
            .map_err(|e| SeccompError(e.to_string()))?
            .try_into()
            .map_err(|e: seccompiler::BackendError| SeccompError(e.to_string()))
    };
    Ok(vec![compile(allowlist())?, compile(no_clone3())?])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `attempt` (raw system calls only: it runs in a forked copy of
    /// the multi-threaded test process) under the filters, in a child, and
    /// returns its exit code.
    fn under_filters(attempt: fn() -> i32) -> i32 {
        let filters = default_filters().unwrap();
        let progs: Vec<libc::sock_fprog> = filters
            .iter()
            .map(|f| libc::sock_fprog {
                len: u16::try_from(f.len()).unwrap(),
                filter: f.as_ptr().cast_mut().cast(),
            })
            .collect();
        // SAFETY: the child makes raw system calls only and leaves with
        // _exit; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                for prog in &progs {
                    // Without no_new_privs the filter needs CAP_SYS_ADMIN:
                    // the tests run as root.
                    if libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0,
                        std::ptr::from_ref(prog),
                    ) != 0
                    {
                        libc::_exit(100);
                    }
                }
                libc::_exit(attempt());
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &raw mut status, 0), pid);
            assert!(libc::WIFEXITED(status), "the child died: {status}");
            libc::WEXITSTATUS(status)
        }
    }

    /// The errno of a failed system call, or 0 if it succeeded.
    fn errno_of(result: libc::c_long) -> i32 {
        if result >= 0 {
            0
        } else {
            // SAFETY: reads this thread's errno.
            unsafe { *libc::__errno_location() }
        }
    }

    #[test]
    fn both_filters_compile_within_the_kernel_limit() {
        let filters = default_filters().unwrap();
        assert_eq!(filters.len(), 2);
        for f in &filters {
            assert!(f.len() < 4096, "{} instructions", f.len());
        }
    }

    #[test]
    fn refused_calls_get_eperm() {
        // bpf(BPF_PROG_LOAD, NULL, 0): without the filter, EFAULT or EINVAL.
        let code = under_filters(|| {
            // SAFETY: raw system call with a null attribute pointer.
            errno_of(unsafe { libc::syscall(libc::SYS_bpf, 5, 0, 0) })
        });
        assert_eq!(code, libc::EPERM);
        let code = under_filters(|| {
            // SAFETY: as above.
            errno_of(unsafe { libc::syscall(libc::SYS_perf_event_open, 0, 0, -1, -1, 0) })
        });
        assert_eq!(code, libc::EPERM);
        let code = under_filters(|| {
            // SAFETY: keyctl(KEYCTL_GET_KEYRING_ID, …) reads nothing of ours.
            errno_of(unsafe { libc::syscall(libc::SYS_keyctl, 0, -3, 0) })
        });
        assert_eq!(code, libc::EPERM);
        let code = under_filters(|| {
            // SAFETY: unshare with a flag, no memory.
            errno_of(unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) })
        });
        assert_eq!(code, libc::EPERM);
        let code = under_filters(|| {
            // SAFETY: io_uring_setup(1, NULL).
            errno_of(unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, 0) })
        });
        assert_eq!(code, libc::EPERM);
    }

    #[test]
    fn clone_with_namespace_flags_is_refused_and_clone3_says_enosys() {
        let code = under_filters(|| {
            // SAFETY: clone with a namespace flag and SIGCHLD; refused
            // before it could create anything.
            errno_of(unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    libc::CLONE_NEWNET | libc::SIGCHLD,
                    0,
                    0,
                    0,
                    0,
                )
            })
        });
        assert_eq!(code, libc::EPERM);
        let code = under_filters(|| {
            // SAFETY: clone3 with a null argument; refused by the filter.
            errno_of(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) })
        });
        assert_eq!(code, libc::ENOSYS);
    }

    #[test]
    fn ordinary_calls_and_plain_fork_work() {
        let code = under_filters(|| {
            // SAFETY: getpid, and a fork whose child exits at once.
            unsafe {
                if libc::syscall(libc::SYS_getpid) <= 0 {
                    return 1;
                }
                let pid = libc::fork();
                if pid == 0 {
                    libc::_exit(7);
                }
                if pid < 0 {
                    return 2;
                }
                let mut status = 0;
                libc::waitpid(pid, &raw mut status, 0);
                if libc::WEXITSTATUS(status) != 7 {
                    return 3;
                }
                // The persona query works; ADDR_NO_RANDOMIZE would turn
                // address randomisation off: refused.
                if libc::syscall(libc::SYS_personality, PERSONA_QUERY) < 0 {
                    return 4;
                }
                if errno_of(libc::syscall(
                    libc::SYS_personality,
                    libc::ADDR_NO_RANDOMIZE,
                )) != libc::EPERM
                {
                    return 5;
                }
            }
            0
        });
        assert_eq!(code, 0);
    }
}
