//! `xcloud jail`: runs one VMM (`xcloud run` or `xcloud restore`) jailed, as xcloudd starts
//! every VMM when it runs as root (docs/cloud-api.md, "Isolation"):
//!
//! - its own PID namespace (the VMM is its PID 1; this process waits for it and passes its end
//!   on) and its own mount namespace, whose root is the VM's directory (pivot_root): the VMM
//!   sees its image, its snapshots, its control socket, a private `/dev/kvm` node and its own
//!   `/proc`, and no other file of the host;
//! - an unprivileged uid and gid, no supplementary groups, no new privileges;
//! - a seccomp filter that allows only the system calls a VMM makes and kills it on any other.
//!
//! Its cgroup is the daemon's business (it enters it before this program starts).

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// The system calls a VMM makes (`xcloud run`, `restore`, `receive`, and what its control
/// socket asks: pause, resume, snapshot, status, stop, migrate), read off strace of those
/// paths and the VMM's code.
const ALLOWED: &[i64] = &[
    // The VMM lowers its background threads (migration's copying, KVM's NX recovery);
    // without CAP_SYS_NICE (the jail's uid has none) no priority can be raised.
    libc::SYS_setpriority,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_close,
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_flock,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_getdents64,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_brk,
    libc::SYS_memfd_create,
    libc::SYS_userfaultfd,
    libc::SYS_ioctl,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_getrandom,
    libc::SYS_prctl,
    libc::SYS_prlimit64,
    libc::SYS_arch_prctl,
    libc::SYS_set_tid_address,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_umask,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    // The jail's own exec of the VMM comes after the filter is in place.
    libc::SYS_execve,
    libc::SYS_execveat,
];

/// What to jail.
pub struct JailSpec {
    /// The VM's directory: the VMM's root.
    pub root: PathBuf,
    /// The uid and gid the VMM runs as.
    pub uid: u32,
    /// The gid.
    pub gid: u32,
    /// The VMM's arguments (after the program name).
    pub args: Vec<String>,
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe; the pid is the VMM this process forked.
        unsafe { libc::kill(child, signal) };
    }
}

fn check(what: &str, r: libc::c_int) -> Result<()> {
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte")
}

/// The seccomp filter of a jailed VMM.
pub fn filter() -> Result<seccompiler::BpfProgram> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = ALLOWED.iter().map(|&n| (n, Vec::new())).collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::KillProcess,
        seccompiler::SeccompAction::Allow,
        seccompiler::TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Runs the VMM jailed and returns its exit status (a VMM killed by a signal kills this
/// process with the same signal, so that the daemon sees what happened).
pub fn jail(spec: &JailSpec) -> Result<i32> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "xcloud jail needs root (it makes namespaces and a device node, then drops to uid {})",
            spec.uid
        );
    }
    if spec.uid == 0 || spec.gid == 0 {
        bail!("a jailed VMM runs as an unprivileged uid and gid, not 0");
    }
    let root = std::fs::canonicalize(&spec.root).with_context(|| format!("the jail root {}", spec.root.display()))?;
    let exe = std::fs::File::open("/proc/self/exe").context("opening this program to run it in the jail")?;
    let kvm = std::fs::metadata("/dev/kvm").context("/dev/kvm")?;
    let program = filter()?;
    let mut argv: Vec<CString> = vec![CString::new("xcloud")?];
    for a in &spec.args {
        argv.push(CString::new(a.as_str()).context("an argument with a NUL byte")?);
    }
    let env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k == "XCLOUD_LOG")
        .filter_map(|(k, v)| CString::new([k.as_bytes(), b"=", v.as_bytes()].concat()).ok())
        .collect();
    let root_c = cstr(&root)?;
    let dev = root.join("dev");
    let kvm_node = cstr(&dev.join("kvm"))?;
    let proc_dir = root.join("proc");
    let proc_c = cstr(&proc_dir)?;
    std::fs::create_dir_all(&dev)?;
    std::fs::create_dir_all(&proc_dir)?;
    let _ = std::fs::remove_file(dev.join("kvm"));

    // SAFETY: unshare changes this (single-threaded) process's namespaces; the PID namespace
    // applies to the child forked next.
    check("unshare", unsafe {
        libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID)
    })?;
    // A pipe whose write end only the parent keeps: its read end turns readable (EOF) in the
    // child once the parent is gone.
    let mut pipe = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into a live array.
    check("pipe2", unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) })?;
    let parent = pipe[0];
    // SAFETY: this process has one thread, so the child is a full copy; it only makes system
    // calls and execs, or exits with _exit.
    let child = unsafe { libc::fork() };
    if child < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: closes the child's copy of the write end (the parent's stays open).
        unsafe { libc::close(pipe[1]) };
        let status = match enter_jail(
            spec,
            &root_c,
            &kvm_node,
            kvm_rdev(&kvm),
            &proc_c,
            &program,
            exe.as_raw_fd(),
            &argv,
            &env,
            parent,
        ) {
            Ok(()) => 1,
            Err(e) => {
                eprintln!("xcloud jail: {e:#}");
                1
            }
        };
        // SAFETY: ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(status) };
    }
    // SAFETY: the parent keeps the write end (open until it exits) and drops the read end.
    unsafe { libc::close(pipe[0]) };
    CHILD.store(child, Ordering::SeqCst);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs an async-signal-safe handler that only calls kill(2).
        unsafe { libc::signal(signal, forward as *const () as libc::sighandler_t) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for the child this process forked; `status` is a live int.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            bail!("waiting for the jailed VMM: {}", std::io::Error::last_os_error());
        }
    }
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // SAFETY: restores the default action and raises the VMM's signal on this process.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
        return Ok(128 + signal);
    }
    Ok(libc::WEXITSTATUS(status))
}

fn kvm_rdev(meta: &std::fs::Metadata) -> libc::dev_t {
    use std::os::unix::fs::MetadataExt;
    meta.rdev()
}

/// In the child: the mount namespace's new root, the uid, the filter, then the VMM.
#[allow(clippy::too_many_arguments)]
fn enter_jail(
    spec: &JailSpec,
    root: &CString,
    kvm_node: &CString,
    kvm_dev: libc::dev_t,
    proc_dir: &CString,
    program: &seccompiler::BpfProgram,
    exe: i32,
    argv: &[CString],
    env: &[CString],
    parent_alive: i32,
) -> Result<()> {
    // SAFETY: each call takes NUL-terminated strings that live across it, or plain
    // integers; none touches memory of this process other than what it is given.
    unsafe {
        let none = std::ptr::null::<libc::c_char>();
        check(
            "making the mounts private",
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
        check(
            "binding the jail root",
            libc::mount(
                root.as_ptr(),
                root.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
        )?;
        check(
            "making the VMM's /dev/kvm",
            libc::mknod(kvm_node.as_ptr(), libc::S_IFCHR | 0o600, kvm_dev),
        )?;
        check(
            "giving /dev/kvm to the VMM",
            libc::chown(kvm_node.as_ptr(), spec.uid, spec.gid),
        )?;
        check(
            "mounting the VMM's /proc",
            libc::mount(
                c"proc".as_ptr(),
                proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
        )?;
        check("entering the jail root", libc::chdir(root.as_ptr()))?;
        check(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
        )?;
        check(
            "detaching the host's root",
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
        )?;
        check("chdir /", libc::chdir(c"/".as_ptr()))?;
        check("dropping supplementary groups", libc::setgroups(0, std::ptr::null()))?;
        check("setgid", libc::setgid(spec.gid))?;
        check("setuid", libc::setuid(spec.uid))?;
        if libc::setuid(0) == 0 {
            bail!("the VMM could become root again");
        }
        // The VMM dies with the jail process (the daemon's handle on it); set after the uid
        // changes, which clear it. Its parent lives in the outer PID namespace, so getppid()
        // says 0 here and cannot tell whether it ended before this line: the parent's pipe
        // can, it is closed by the parent's end.
        check("prctl(PDEATHSIG)", libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
        let mut probe = libc::pollfd {
            fd: parent_alive,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut probe, 1, 0) != 0 {
            bail!("the jail's parent ended before the VMM started");
        }
        libc::close(parent_alive);
        check("no new privileges", libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    seccompiler::apply_filter(program).context("installing the seccomp filter")?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_p.push(std::ptr::null());
    // SAFETY: fexecve takes a descriptor of this program and NULL-terminated arrays of
    // NUL-terminated strings that outlive the call; it returns only on failure.
    unsafe { libc::fexecve(exe, argv_p.as_ptr(), env_p.as_ptr()) };
    bail!("exec of the VMM: {}", std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    /// Forks a child that installs the filter and makes system call `nr`; its wait status.
    fn in_filtered_child(nr: i64) -> i32 {
        let program = super::filter().expect("filter");
        // SAFETY: the child only makes system calls (prctl, seccomp, `nr`) and _exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            let ok = seccompiler::apply_filter(&program).is_ok();
            // SAFETY: a system call with zero arguments; then the child ends.
            unsafe {
                libc::syscall(nr, 0, 0, 0);
                libc::_exit(if ok { 0 } else { 3 });
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(child, &mut status, 0) };
        status
    }

    #[test]
    fn the_filter_kills_a_vmm_that_steps_outside_it() {
        let allowed = in_filtered_child(libc::SYS_getpid);
        assert!(libc::WIFEXITED(allowed) && libc::WEXITSTATUS(allowed) == 0, "{allowed}");
        for forbidden in [libc::SYS_unshare, libc::SYS_mount, libc::SYS_ptrace, libc::SYS_setuid] {
            let status = in_filtered_child(forbidden);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "system call {forbidden}: status {status}"
            );
        }
    }
}
