//! Starting the target: namespaces, fork, filter install and listener
//! hand-off, exec; and the process chores of a supervisor (signals,
//! subreaping, waiting).
//!
//! The launch sequence:
//! 1. the parent builds everything the child needs (argv, env, filter)
//!    before `fork`, because a child forked from a multi-threaded process
//!    may only make async-signal-safe calls;
//! 2. the child resets its signals, sets `no_new_privs`, installs the
//!    filter, sends the listener over a socket pair and waits for one byte;
//! 3. the parent starts answering notifications, then sends that byte;
//! 4. the child execs; the socket is close-on-exec, so the parent reads
//!    end-of-file on success, or the exec errno on failure.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use thiserror::Error;

use crate::seccomp::{self, Listener, Program};

mod isolation;
mod limited;
mod reaping;
mod signals;

pub use isolation::isolate;
pub use limited::{SharedPage, run_limited};
pub use reaping::{
    ExitStatus, become_subreaper, children_of, has_exited, reap_orphans, wait_any, wait_for,
};
pub use signals::{
    Pidfd, SignalSet, WAKE_SIGNAL, catches_signal, current_thread, install_wake_handler, kill,
    wake_thread,
};

/// Why a target could not be started.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// An argument or environment entry contains a NUL byte.
    #[error("{what} contains a NUL byte: {value:?}")]
    Nul {
        /// Which input.
        what: &'static str,
        /// The offending value.
        value: String,
    },
    /// No program was given.
    #[error("no program to run")]
    NoProgram,
    /// A system call of the parent failed.
    #[error("{step}: {source}")]
    Parent {
        /// What the parent was doing.
        step: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The child failed before exec.
    #[error("{step}: {}", io::Error::from_raw_os_error(*errno))]
    Child {
        /// What the child was doing.
        step: &'static str,
        /// The errno it got.
        errno: i32,
    },
    /// The process already runs under a seccomp filter that has a
    /// user-notification listener: the kernel allows one per filter chain.
    #[error(
        "another seccomp user-notification listener already supervises this process (EBUSY: another faultbox, a sandbox or a container runtime installed one, and the kernel allows one per process): run faultbox outside it, or give the service seccomp=False"
    )]
    ListenerBusy,
    /// `execve` itself failed.
    #[error("cannot execute {program:?}: {}", io::Error::from_raw_os_error(*errno))]
    Exec {
        /// The program.
        program: String,
        /// The errno of `execve`.
        errno: i32,
    },
    /// Namespaces could not be set up.
    #[error(
        "cannot isolate the target ({step}): {source}; run with --no-isolation, or check that unprivileged user namespaces are enabled (sysctl kernel.unprivileged_userns_clone=1)"
    )]
    Isolation {
        /// The failing step.
        step: &'static str,
        /// The error.
        source: io::Error,
    },
    /// `user=` asks for an account the shim cannot switch to or find.
    #[error("user={name:?}: {reason}")]
    Account {
        /// The account as written.
        name: String,
        /// Why, with the fix.
        reason: String,
    },
}

/// Everything the child needs, prepared before `fork`.
#[derive(Clone)]
pub struct ChildSpec {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: Option<CString>,
    filter: Option<Program>,
    cookie: u64,
    new_pid_namespace: bool,
    credentials: Option<(libc::uid_t, libc::gid_t)>,
}

fn cstring(what: &'static str, value: &str) -> Result<CString, LaunchError> {
    CString::new(value).map_err(|_| LaunchError::Nul {
        what,
        value: value.to_string(),
    })
}

impl ChildSpec {
    /// Prepares a launch of `program` with `argv` and exactly `env`, in
    /// `cwd`, under a filter intercepting `nrs` (no filter at all when `nrs`
    /// is empty).
    pub fn new(
        program: &str,
        argv: &[String],
        env: &[String],
        cwd: Option<&str>,
        arch: crate::syscalls::Arch,
        nrs: &[u32],
    ) -> Result<ChildSpec, LaunchError> {
        if program.is_empty() || argv.is_empty() {
            return Err(LaunchError::NoProgram);
        }
        let program = cstring("program", program)?;
        let argv = argv
            .iter()
            .map(|a| cstring("argument", a))
            .collect::<Result<_, _>>()?;
        let envp = env
            .iter()
            .map(|e| cstring("environment entry", e))
            .collect::<Result<_, _>>()?;
        let cwd = cwd.map(|c| cstring("working directory", c)).transpose()?;
        let cookie = random_u64();
        let filter =
            (!nrs.is_empty()).then(|| Program::new(&seccomp::build_filter(arch, nrs, cookie)));
        Ok(ChildSpec {
            program,
            argv,
            envp,
            cwd,
            filter,
            cookie,
            new_pid_namespace: false,
            credentials: None,
        })
    }

    /// Replaces the filter with an exact program, for baselines that
    /// compare our filter with others (a bare ALLOW filter, say).
    pub fn with_filter(mut self, insns: &[seccomp::Insn]) -> ChildSpec {
        self.filter = Some(Program::new(insns));
        self
    }

    /// Runs the target as `uid`/`gid` (supplementary groups: just `gid`).
    /// The switch happens after the filter is installed, so a server that
    /// refuses to run as root (PostgreSQL) can still be faulted.
    pub fn with_credentials(mut self, uid: libc::uid_t, gid: libc::gid_t) -> ChildSpec {
        self.credentials = Some((uid, gid));
        self
    }

    /// Starts the child as PID 1 of a new PID namespace.
    pub fn in_new_pid_namespace(mut self, yes: bool) -> ChildSpec {
        self.new_pid_namespace = yes;
        self
    }
}

/// A forked child that has handed over its listener but not yet exec'd.
pub struct Spawned {
    /// The child's pid (in the parent's PID namespace).
    pub pid: i32,
    /// The filter's listener, when a filter was installed.
    pub listener: Option<Listener>,
    /// Whether the kernel accepted `WAIT_KILLABLE_RECV`.
    pub wait_killable: bool,
    handoff: OwnedFd,
    program: String,
    /// What the child reads until it execs (see [`ChildMemory`]).
    memory: Option<Box<ChildMemory>>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // The child may still run on `memory`: it must be gone first.
        if self.memory.is_some() {
            kill_and_reap(self.pid);
        }
    }
}

const TAG_LISTENER: u8 = b'F';
const TAG_READY: u8 = b'R';
const TAG_CHILD_ERROR: u8 = b'E';
const TAG_EXEC_ERROR: u8 = b'X';

const STEPS: &[(u8, &str)] = &[
    (b'p', "set the parent-death signal"),
    (b'c', "change to the working directory"),
    (b'n', "set no_new_privs"),
    (
        b's',
        "install the seccomp filter (the kernel needs seccomp user notification, Linux 5.0+ with CONFIG_SECCOMP_FILTER)",
    ),
    (b'h', "hand the listener to the supervisor"),
    (b'u', "switch to the requested user"),
];

/// A forked child that is installing its filter.
struct Forked {
    pid: i32,
    handoff: OwnedFd,
    program: String,
    memory: Option<Box<ChildMemory>>,
}

/// Forks the child, which installs the filter and hands its listener over,
/// then waits for [`Spawned::release`] before it execs.
pub fn spawn(spec: &ChildSpec) -> Result<Spawned, LaunchError> {
    fork_child(spec)?.handoff()
}

/// What the launching child reads until it execs. The child shares the
/// parent's memory (`CLONE_VM`), so all of it is owned here, at a fixed
/// address, until the child has exec'd or exited: [`Spawned`] keeps it
/// until [`Spawned::exec_result`], and kills and reaps the child before
/// freeing it otherwise.
struct ChildMemory {
    spec: ChildSpec,
    sock: i32,
    parent_pid: libc::pid_t,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    stack: Vec<u8>,
}

// SAFETY: the raw pointers point into `spec`'s CStrings, owned by the same
// struct; nothing here is tied to the thread that built it.
#[allow(unsafe_code)]
unsafe impl Send for ChildMemory {}

/// The launching child's stack: `child_main` and what it calls use a few
/// KiB; the rest is never touched (the allocation is lazily backed).
const CHILD_STACK: usize = 256 << 10;

extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildMemory the parent keeps alive, unmoved,
    // until this child has exec'd or exited.
    let mem = unsafe { &*(arg as *const ChildMemory) };
    child_main(&mem.spec, mem.sock, mem.parent_pid, &mem.argv, &mem.envp)
}

/// The first half of [`spawn`]: start the child, and let it set itself up.
///
/// `clone(CLONE_VM)` rather than `fork`, as `posix_spawn` does: the
/// parent's page tables are neither copied nor torn down again by the
/// child's exec, which on these machines is most of what a launch costs
/// beyond a plain fork+exec. Unlike `vfork`, the parent goes on at once:
/// it must serve the hand-off while the child waits.
fn fork_child(spec: &ChildSpec) -> Result<Forked, LaunchError> {
    let (parent_end, child_end) =
        seccomp::handoff_pair().map_err(|source| LaunchError::Parent {
            step: "create the hand-off socket",
            source,
        })?;
    let mut mem = Box::new(ChildMemory {
        spec: spec.clone(),
        sock: child_end.as_raw_fd(),
        // SAFETY: getpid has no preconditions.
        parent_pid: unsafe { libc::getpid() },
        argv: Vec::new(),
        envp: Vec::new(),
        stack: vec![0u8; CHILD_STACK],
    });
    mem.argv = mem.spec.argv.iter().map(|a| a.as_ptr()).collect();
    mem.argv.push(std::ptr::null());
    mem.envp = mem.spec.envp.iter().map(|e| e.as_ptr()).collect();
    mem.envp.push(std::ptr::null());
    // The stack grows down from the 16-byte aligned end of the buffer.
    let top = {
        let end = mem.stack.as_mut_ptr() as usize + mem.stack.len();
        (end & !15) as *mut libc::c_void
    };
    // The new PID namespace is made by this clone rather than by unshare in
    // the supervisor: after unshare(CLONE_NEWPID) the kernel refuses to
    // create threads in the caller (EINVAL), and the supervisor needs them.
    let flags = libc::CLONE_VM
        | libc::SIGCHLD
        | if spec.new_pid_namespace {
            libc::CLONE_NEWPID
        } else {
            0
        };
    // SAFETY: the child runs `child_entry` on its own stack, reading only
    // `mem`, which stays alive and in place (boxed, owned by Forked and
    // then Spawned) until the child has exec'd or been reaped.
    let pid = unsafe {
        libc::clone(
            child_entry,
            top,
            flags,
            &*mem as *const ChildMemory as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(LaunchError::Parent {
            step: "fork",
            source: io::Error::last_os_error(),
        });
    }
    // The child has its own descriptor table (no CLONE_FILES).
    drop(child_end);
    Ok(Forked {
        pid,
        handoff: parent_end,
        program: spec.program.to_string_lossy().into_owned(),
        memory: Some(mem),
    })
}

impl Forked {
    /// The second half of [`spawn`]: waits for the child's listener.
    fn handoff(self) -> Result<Spawned, LaunchError> {
        // On failure the child is reaped before `memory` is dropped.
        let Forked {
            pid,
            handoff: parent_end,
            program,
            memory,
        } = self;
        let fail = |error: LaunchError| {
            reap(pid);
            Err(error)
        };
        let message = match seccomp::recv_handoff(&parent_end) {
            Ok(Some(m)) => m,
            Ok(None) => {
                return fail(LaunchError::Child {
                    step: "start",
                    errno: libc::ECHILD,
                });
            }
            Err(source) => {
                return fail(LaunchError::Parent {
                    step: "receive the listener",
                    source,
                });
            }
        };
        match (message.tag, message.payload, message.fd) {
            (TAG_LISTENER, rest, Some(fd)) => Ok(Spawned {
                pid,
                listener: Some(Listener::new(fd)),
                wait_killable: rest[0] == 1,
                handoff: parent_end,
                program,
                memory,
            }),
            (TAG_READY, _, _) => Ok(Spawned {
                pid,
                listener: None,
                wait_killable: false,
                handoff: parent_end,
                program,
                memory,
            }),
            (TAG_CHILD_ERROR, rest, _) => fail(child_error(rest)),
            _ => fail(LaunchError::Child {
                step: "hand the listener to the supervisor",
                errno: libc::EPROTO,
            }),
        }
    }
}

fn child_error(payload: [u8; 4]) -> LaunchError {
    let step = STEPS
        .iter()
        .find(|(tag, _)| *tag == payload[0])
        .map(|(_, s)| *s)
        .unwrap_or("prepare the target");
    let errno = i32::from_le_bytes([payload[1], payload[2], payload[3], 0]);
    if payload[0] == b's' && errno == libc::EBUSY {
        return LaunchError::ListenerBusy;
    }
    LaunchError::Child { step, errno }
}

impl Spawned {
    /// Lets the child exec, and reports whether `execve` succeeded.
    pub fn release(&mut self) -> Result<(), LaunchError> {
        self.go()?;
        self.exec_result()
    }

    /// Lets the child exec (the acknowledgement it waits for after the
    /// hand-off). Its intercepted calls wait in the kernel until someone
    /// serves the listener, so the supervisor may be prepared after this,
    /// while the child execs.
    pub fn go(&mut self) -> Result<(), LaunchError> {
        // SAFETY: writing one byte from a valid buffer.
        let n = unsafe { libc::write(self.handoff.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        if n != 1 {
            let err = io::Error::last_os_error();
            reap(self.pid);
            self.memory = None;
            return Err(LaunchError::Parent {
                step: "release the target",
                source: err,
            });
        }
        Ok(())
    }

    /// Waits until the child's `execve` succeeded (its end of the hand-off
    /// socket closes on exec) or failed (it reports the errno).
    pub fn exec_result(&mut self) -> Result<(), LaunchError> {
        let parent = |step, source| LaunchError::Parent { step, source };
        let outcome = match seccomp::recv_handoff(&self.handoff) {
            // End of file: the child's end closed on exec. (It cannot be an
            // exit: the child always reports before it exits.)
            Ok(None) => Ok(()),
            Ok(Some(m)) if m.tag == TAG_EXEC_ERROR => {
                reap(self.pid);
                Err(LaunchError::Exec {
                    program: self.program.clone(),
                    errno: i32::from_le_bytes(m.payload),
                })
            }
            Ok(Some(m)) if m.tag == TAG_CHILD_ERROR => {
                reap(self.pid);
                Err(child_error(m.payload))
            }
            Ok(Some(_)) => {
                kill_and_reap(self.pid);
                Err(parent(
                    "wait for exec",
                    io::Error::from_raw_os_error(libc::EPROTO),
                ))
            }
            Err(e) => {
                kill_and_reap(self.pid);
                Err(parent("wait for exec", e))
            }
        };
        // Exec'd (its own memory now) or reaped: the child no longer
        // reads ours.
        self.memory = None;
        outcome
    }
}

/// The child, from `clone` to `execve`. It runs in the parent's memory
/// on its own stack (`CLONE_VM`), so it allocates nothing, touches only
/// what [`ChildMemory`] owns, and makes every syscall through
/// [`seccomp::raw_syscall`] (glibc's `errno` is the parent's here).
fn child_main(
    spec: &ChildSpec,
    sock: i32,
    parent_pid: libc::pid_t,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let cookie = spec.cookie;
    let exit = |code: usize| -> ! {
        loop {
            // SAFETY: exit takes an integer and does not return.
            let _ = unsafe { seccomp::raw_syscall(libc::SYS_exit_group, [code, 0, 0, 0, 0, 0]) };
        }
    };
    let report = |step: u8, errno: i32| -> ! {
        let e = errno.to_le_bytes();
        let _ =
            seccomp::write_with_cookie(sock, &[TAG_CHILD_ERROR, step, e[0], e[1], e[2]], cookie);
        exit(126)
    };
    // SAFETY (every raw_syscall below): integer arguments, or pointers to
    // locals and to `spec`, which outlive the calls.
    let sys = |nr: libc::c_long, args: [usize; 6]| unsafe { seccomp::raw_syscall(nr, args) };
    let none: u64 = 0;
    // An empty mask, then default dispositions (one kernel sigaction, all
    // zero: SIG_DFL, no flags, no mask, for both kernel layouts).
    let _ = sys(
        libc::SYS_rt_sigprocmask,
        [
            libc::SIG_SETMASK as usize,
            &none as *const u64 as usize,
            0,
            8,
            0,
            0,
        ],
    );
    let default_action = [0u64; 4];
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGPIPE,
        libc::SIGUSR2,
        libc::SIGCHLD,
    ] {
        let _ = sys(
            libc::SYS_rt_sigaction,
            [sig as usize, default_action.as_ptr() as usize, 0, 8, 0, 0],
        );
    }
    let prctl =
        |option: i32, value: usize| sys(libc::SYS_prctl, [option as usize, value, 0, 0, 0, 0]);
    // A target must not outlive its shim, whatever kills the shim.
    if let Err(e) = prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as usize) {
        report(b'p', e);
    }
    // The parent may have died before PDEATHSIG was armed. As PID 1 of a
    // new PID namespace the child sees its parent as pid 0, and cannot
    // tell; the shim's death still kills the whole namespace then.
    let ppid = sys(libc::SYS_getppid, [0; 6]).unwrap_or(0) as libc::pid_t;
    if ppid != 0 && ppid != parent_pid {
        exit(126);
    }
    if let Some(cwd) = &spec.cwd
        && let Err(e) = sys(libc::SYS_chdir, [cwd.as_ptr() as usize, 0, 0, 0, 0, 0])
    {
        report(b'c', e);
    }
    if let Err(e) = prctl(libc::PR_SET_NO_NEW_PRIVS, 1) {
        report(b'n', e);
    }
    match &spec.filter {
        Some(filter) => match filter.install() {
            Ok((listener, killable)) => {
                let payload = [TAG_LISTENER, u8::from(killable)];
                if let Err(errno) = seccomp::send_fd_with_cookie(sock, listener, payload, cookie) {
                    report(b'h', errno);
                }
            }
            Err(errno) => report(b's', errno),
        },
        None => {
            let _ = seccomp::write_with_cookie(sock, &[TAG_READY], cookie);
        }
    }
    // After the hand-off, so that a rule on setuid and friends is answered
    // by the supervisor instead of parking the child forever. Raw
    // syscalls: glibc's wrappers broadcast the change to every thread they
    // believe exists, and waited forever on that broadcast's lock in a
    // child of the multi-threaded shim. Credentials are per thread in the
    // kernel, and the child is one thread.
    if let Some((uid, gid)) = spec.credentials {
        let groups = [gid];
        for (nr, args) in [
            (
                libc::SYS_setgroups,
                [1, groups.as_ptr() as usize, 0, 0, 0, 0],
            ),
            (libc::SYS_setgid, [gid as usize, 0, 0, 0, 0, 0]),
            (libc::SYS_setuid, [uid as usize, 0, 0, 0, 0, 0]),
        ] {
            if let Err(e) = sys(nr, args) {
                report(b'u', e);
            }
        }
        // Changing credentials clears the parent-death signal.
        if let Err(e) = prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as usize) {
            report(b'p', e);
        }
    }
    let mut ack = [0u8; 1];
    if seccomp::read_spinning_with_cookie(sock, &mut ack, cookie) != Ok(1) {
        exit(126);
    }
    let errno = seccomp::execve_with_cookie(&spec.program, argv, envp, cookie);
    let e = errno.to_le_bytes();
    let _ = seccomp::write_with_cookie(sock, &[TAG_EXEC_ERROR, e[0], e[1], e[2], e[3]], cookie);
    exit(127)
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        // Without the kernel's RNG, fall back to something that still
        // differs per launch; the cookie only has to be unguessable by
        // accident, not by an attacker.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    }
    u64::from_le_bytes(buf)
}

/// Kills `pid` and reaps it.
fn kill_and_reap(pid: i32) {
    kill(pid, libc::SIGKILL);
    reap(pid);
}

/// Waits for `pid` and discards its status.
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid writes the status into a valid int.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
    }
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Resolves `program` the way `execvp` would: a name without `/` is looked
/// up in `PATH`. Returns the path to execute.
pub fn resolve_program(program: &str, path_var: Option<&str>) -> Option<String> {
    if program.contains('/') {
        return Some(program.to_string());
    }
    let search = path_var.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    search
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| is_executable(p))
        .map(|p| p.to_string_lossy().into_owned())
}

/// Whether `path` is a regular file the caller may execute.
pub fn is_executable(path: &Path) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access reads a valid C string.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// Clears close-on-exec on `fd`, so a child started next inherits it.
pub fn make_inheritable(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: F_SETFD with a flag value on an fd the caller owns.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Adopts an inherited fd as a Unix stream (the shim's control socket when
/// the controller started it), marking it close-on-exec so the target never
/// inherits it.
pub fn adopt_unix_stream(fd: i32) -> io::Result<std::os::unix::net::UnixStream> {
    // SAFETY: F_GETFD only queries the descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFD with a flag value.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes an int into `kind`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || kind != libc::SOCK_STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is not a stream socket"),
        ));
    }
    // SAFETY: the fd is open, is a stream socket, and the caller hands its
    // ownership to us.
    Ok(unsafe { <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Raises the soft limit on open descriptors to the hard limit (best
/// effort: a failure leaves the limit as it was).
pub fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The uid and gid of account `name`: a numeric `uid[:gid]`, or an entry
/// of `/etc/passwd`. A static binary has no NSS, so accounts from LDAP and
/// the like are not visible; the numeric form works for those.
pub fn lookup_account(name: &str) -> Result<(u32, u32), LaunchError> {
    let fail = |reason: String| LaunchError::Account {
        name: name.to_string(),
        reason,
    };
    if let Some((uid, gid)) = name.split_once(':')
        && let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse())
    {
        return Ok((uid, gid));
    }
    if let Ok(uid) = name.parse::<u32>() {
        return Ok((uid, uid));
    }
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| fail(format!("cannot read /etc/passwd: {e}")))?;
    passwd
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        })
        .next()
        .flatten()
        .ok_or_else(|| {
            fail("no such account in /etc/passwd (create it, or give a numeric uid:gid)".into())
        })
}
