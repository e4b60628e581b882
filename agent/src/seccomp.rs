//! The seccomp user-notification interface: the BPF filter, installing it,
//! the listener's ioctls, and reading the caller's memory.
//!
//! The filter dispatches on the syscall number before touching anything
//! else, so the kernel can prove "always allow" for every untargeted number
//! and cache it: untargeted syscalls then cost the same as under a bare
//! ALLOW filter.
//!
//! Between installing the filter and exec, the launching child still has to
//! hand the listener over (`sendmsg`), wait for the go-ahead (`read`) and
//! `execve`. If a rule targets one of those, nobody is listening yet and the
//! child would hang forever. So the child passes a random per-launch cookie
//! in the sixth argument register (which those syscalls ignore), and the
//! filter allows a targeted call that carries it. After exec nothing knows
//! the cookie, so no fd or syscall of the target is whitelisted.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::syscalls::Arch;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;

/// `SECCOMP_RET_ALLOW`.
pub const RET_ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_USER_NOTIF`.
pub const RET_USER_NOTIF: u32 = 0x7fc0_0000;

const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
// seccomp_data.args[5], as two little-endian 32-bit halves.
const OFFSET_ARG5_LO: u32 = 16 + 8 * 5;
const OFFSET_ARG5_HI: u32 = OFFSET_ARG5_LO + 4;

/// One classic-BPF instruction (the layout of `struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    /// Jump offset when true.
    pub jt: u8,
    /// Jump offset when false.
    pub jf: u8,
    /// Constant operand.
    pub k: u32,
}

const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// Builds the filter: calls to `nrs` on `arch` notify user space unless
/// they carry `cookie` in argument 5; everything else is allowed.
pub fn build_filter(arch: Arch, nrs: &[u32], cookie: u64) -> Vec<Insn> {
    let mut nrs = nrs.to_vec();
    nrs.sort_unstable();
    nrs.dedup();
    let mut prog = vec![
        insn(BPF_LD_W_ABS, 0, 0, OFFSET_ARCH),
        insn(BPF_JEQ_K, 1, 0, arch.audit_arch()),
        // Syscalls of another ABI (i386 on x86_64) are not faultable.
        insn(BPF_RET_K, 0, 0, RET_ALLOW),
        insn(BPF_LD_W_ABS, 0, 0, OFFSET_NR),
    ];
    let checks_end = prog.len() + 2 * nrs.len();
    for nr in &nrs {
        prog.push(insn(BPF_JEQ_K, 0, 1, *nr));
        // A JA offset is 32 bits wide, so any number of syscalls fits.
        let here = prog.len();
        prog.push(insn(BPF_JA, 0, 0, (checks_end + 1 - (here + 1)) as u32));
    }
    prog.push(insn(BPF_RET_K, 0, 0, RET_ALLOW));
    prog.extend([
        insn(BPF_LD_W_ABS, 0, 0, OFFSET_ARG5_LO),
        insn(BPF_JEQ_K, 0, 3, cookie as u32),
        insn(BPF_LD_W_ABS, 0, 0, OFFSET_ARG5_HI),
        insn(BPF_JEQ_K, 0, 1, (cookie >> 32) as u32),
        insn(BPF_RET_K, 0, 0, RET_ALLOW),
        insn(BPF_RET_K, 0, 0, RET_USER_NOTIF),
    ]);
    prog
}

/// A filter ready to install: built before `fork`, so the child does not
/// allocate.
#[derive(Clone)]
pub struct Program {
    insns: Vec<libc::sock_filter>,
}

impl Program {
    /// Converts instructions into the kernel's layout.
    pub fn new(insns: &[Insn]) -> Program {
        Program {
            insns: insns
                .iter()
                .map(|i| libc::sock_filter {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect(),
        }
    }

    /// Installs the filter on the calling thread with a new listener, asking
    /// for `WAIT_KILLABLE_RECV` first and retrying without it on kernels
    /// older than 5.19. Returns the listener fd and whether the flag took.
    ///
    /// Async-signal-safe: makes only raw syscalls, so it may run in a child
    /// forked from a multi-threaded process. `no_new_privs` must be set.
    pub fn install(&self) -> Result<(RawFd, bool), i32> {
        let prog = libc::sock_fprog {
            len: self.insns.len() as u16,
            filter: self.insns.as_ptr() as *mut libc::sock_filter,
        };
        let base = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
        for (flags, killable) in [
            (base | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, true),
            (base, false),
        ] {
            // SAFETY: `prog` points at `self.insns`, which outlives the call;
            // the kernel copies the program before returning.
            let rc = unsafe {
                raw_syscall(
                    libc::SYS_seccomp,
                    [
                        libc::SECCOMP_SET_MODE_FILTER as usize,
                        flags as usize,
                        &prog as *const libc::sock_fprog as usize,
                        0,
                        0,
                        0,
                    ],
                )
            };
            match rc {
                Ok(fd) => return Ok((fd as RawFd, killable)),
                Err(errno) if errno == libc::EINVAL && killable => continue,
                Err(errno) => return Err(errno),
            }
        }
        Err(libc::EINVAL)
    }
}

/// Whether the kernel supports `SECCOMP_RET_USER_NOTIF`.
pub fn user_notification_available() -> bool {
    let action: u32 = RET_USER_NOTIF;
    // SAFETY: GET_ACTION_AVAIL reads one u32 from the pointer we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    rc == 0
}

/// One notification, copied out of the kernel's `struct seccomp_notif`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// Cookie identifying the notification.
    pub id: u64,
    /// Caller pid, in the listener owner's PID namespace.
    pub pid: u32,
    /// Syscall number.
    pub nr: u32,
    /// Raw arguments.
    pub args: [u64; 6],
}

/// How to answer a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// Run the syscall as the caller asked.
    Continue,
    /// Fail it with this errno (positive).
    Errno(i32),
}

/// The listener side of a filter.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Takes ownership of a listener fd.
    pub fn new(fd: OwnedFd) -> Listener {
        Listener { fd }
    }

    /// Asks the kernel to wake the target on the supervisor's CPU
    /// (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`, Linux 6.6+): it halves the
    /// round trip when target and supervisor ping-pong. Returns whether the
    /// kernel accepted it; older kernels simply take the slower path.
    pub fn set_sync_wakeup(&self) -> bool {
        const SECCOMP_IOCTL_NOTIF_SET_FLAGS: libc::Ioctl = 0x4008_2104;
        const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
        // SAFETY: this ioctl takes the flags by value and touches no memory.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
            )
        };
        rc == 0
    }

    /// Whether every task the filter applied to is gone (the listener
    /// polls as hung up): no notification can ever arrive again.
    pub fn orphaned(&self) -> bool {
        let mut fd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd we own; timeout 0.
        let rc = unsafe { libc::poll(&mut fd, 1, 0) };
        rc == 1 && fd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }

    /// Blocks until a notification arrives. `Interrupted` when a signal
    /// arrived first; `NotFound` when the caller vanished before we read it.
    pub fn recv(&self) -> io::Result<Notification> {
        let mut raw = MaybeUninit::<libc::seccomp_notif>::zeroed();
        // SAFETY: RECV fills a `seccomp_notif`, which `raw` is sized for;
        // the kernel requires it zeroed, which `zeroed()` does.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                raw.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the ioctl succeeded, so the kernel initialised `raw`.
        let raw = unsafe { raw.assume_init() };
        Ok(Notification {
            id: raw.id,
            pid: raw.pid,
            nr: raw.data.nr as u32,
            args: raw.data.args,
        })
    }

    /// Answers a notification. `NotFound` means the caller was interrupted
    /// (killed, or a signal restarted the call) and the answer is moot.
    pub fn respond(&self, id: u64, response: Response) -> io::Result<()> {
        let mut resp = libc::seccomp_notif_resp {
            id,
            val: 0,
            error: 0,
            flags: 0,
        };
        match response {
            Response::Continue => resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
            Response::Errno(errno) => resp.error = -errno,
        }
        // SAFETY: SEND reads one `seccomp_notif_resp` from the pointer.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &mut resp as *mut libc::seccomp_notif_resp,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether notification `id` is still pending: checked after reading the
    /// caller's memory, so a recycled pid cannot feed us someone else's path.
    pub fn id_valid(&self, id: u64) -> bool {
        let mut id = id;
        // SAFETY: ID_VALID reads one u64 from the pointer.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
                &mut id as *mut u64,
            )
        };
        rc == 0
    }
}

/// Reads a NUL-terminated string of at most `PATH_MAX` bytes at `addr` in
/// process `pid`, one page-bounded chunk at a time so that a string near
/// the end of a mapping still reads.
pub fn read_c_string(pid: u32, addr: u64) -> Option<String> {
    const PAGE: u64 = 4096;
    const MAX: usize = libc::PATH_MAX as usize;
    if addr == 0 {
        return None;
    }
    if VM_READV_REFUSED.load(std::sync::atomic::Ordering::Relaxed) {
        return read_c_string_from_proc(pid, addr);
    }
    // Most paths are short: the first read asks for 256 bytes (not the
    // rest of the page, which costs a copy of up to 4 KiB per call).
    const FIRST: u64 = 256;
    let mut out = Vec::with_capacity(256);
    let mut buf = [0u8; PAGE as usize];
    let mut cursor = addr;
    while out.len() < MAX {
        let to_page_end = PAGE - cursor % PAGE;
        let chunk = if cursor == addr {
            to_page_end.min(FIRST)
        } else {
            to_page_end
        } as usize;
        let n = vm_read(pid, cursor, &mut buf[..chunk]);
        if n < 0
            && matches!(
                io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM | libc::ENOSYS)
            )
        {
            // Docker's default seccomp profile refuses process_vm_readv to
            // a process without CAP_SYS_PTRACE; /proc/<pid>/mem of our own
            // child is still readable. Remember, and read there from now on.
            VM_READV_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
            return read_c_string_from_proc(pid, addr);
        }
        if n <= 0 {
            return None;
        }
        let got = &buf[..n as usize];
        if let Some(end) = got.iter().position(|b| *b == 0) {
            out.extend_from_slice(&got[..end]);
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(got);
        cursor += n as u64;
    }
    None
}

/// Reads exactly `len` bytes at `addr` in process `pid` (`len` is small:
/// a socket address), through `/proc/<pid>/mem` once `process_vm_readv`
/// is refused.
pub fn read_bytes(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    if addr == 0 || len == 0 {
        return None;
    }
    let mut buf = vec![0u8; len];
    if !VM_READV_REFUSED.load(std::sync::atomic::Ordering::Relaxed) {
        let n = vm_read(pid, addr, &mut buf);
        if n == len as isize {
            return Some(buf);
        }
        if n >= 0
            || !matches!(
                io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM | libc::ENOSYS)
            )
        {
            return None;
        }
        VM_READV_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    mem.read_exact_at(&mut buf, addr).ok()?;
    Some(buf)
}

/// One `process_vm_readv` of `buf.len()` bytes at `addr` in `pid`: the
/// bytes read, or -1 with errno set.
fn vm_read(pid: u32, addr: u64, buf: &mut [u8]) -> isize {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes exactly `buf`, which outlives the call;
    // the remote address is only read by the kernel, which checks it.
    unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) }
}

/// Set once `process_vm_readv` is refused (a container's seccomp profile).
static VM_READV_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// [`read_c_string`] through `/proc/<pid>/mem`: slower (an open per call)
/// but allowed where `process_vm_readv` is not.
fn read_c_string_from_proc(pid: u32, addr: u64) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut out = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    let mut at = addr;
    while out.len() < libc::PATH_MAX as usize {
        let n = mem.read_at(&mut buf, at).ok().filter(|n| *n > 0)?;
        if let Some(end) = buf[..n].iter().position(|b| *b == 0) {
            out.extend_from_slice(&buf[..end]);
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&buf[..n]);
        at += n as u64;
    }
    None
}

/// A socket pair for handing the listener from the launching child to the
/// supervisor. Both ends are close-on-exec.
pub fn handoff_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Issues syscall `nr` directly and returns its result, or its error as
/// `Err(errno)` without going through glibc's `errno`.
///
/// The launching child runs in the parent's address space (`CLONE_VM`,
/// as `posix_spawn` does) until it execs, and shares the launching
/// thread's TLS, where glibc keeps `errno`: the parent's own failing calls
/// (a non-blocking `recvmsg`, say) would overwrite the child's. So every
/// syscall of the child goes through here.
///
/// # Safety
/// The arguments must be valid for `nr` (pointers to live memory of the
/// right type and size).
#[inline(always)]
pub unsafe fn raw_syscall(nr: libc::c_long, args: [usize; 6]) -> Result<usize, i32> {
    let ret: isize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the x86_64 syscall convention: number in rax, arguments in
    // rdi, rsi, rdx, r10, r8, r9; the kernel clobbers rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("r10") args[3],
            in("r8") args[4],
            in("r9") args[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: the aarch64 syscall convention: number in x8, arguments in
    // x0..x5, result in x0.
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") args[0] as isize => ret,
            in("x1") args[1],
            in("x2") args[2],
            in("x3") args[3],
            in("x4") args[4],
            in("x5") args[5],
            options(nostack),
        );
    }
    if (-4095..0).contains(&ret) {
        Err(-ret as i32)
    } else {
        Ok(ret as usize)
    }
}

/// `syscall(nr, a0, a1, a2)` with `cookie` in the sixth argument, so that
/// the child's own filter lets it through.
///
/// # Safety
/// As [`raw_syscall`]: the arguments must be valid for `nr`.
unsafe fn with_cookie(
    nr: libc::c_long,
    a0: usize,
    a1: usize,
    a2: usize,
    cookie: u64,
) -> Result<usize, i32> {
    // SAFETY: the caller's arguments are valid for `nr`; the two unused
    // arguments are zero.
    unsafe { raw_syscall(nr, [a0, a1, a2, 0, 0, cookie as usize]) }
}

/// Sends `fd` over `sock` with a two-byte payload, passing `cookie` in the
/// sixth argument so the filter lets this call through.
///
/// Async-signal-safe, and safe in a `CLONE_VM` child (see [`raw_syscall`]).
pub fn send_fd_with_cookie(
    sock: RawFd,
    fd: RawFd,
    payload: [u8; 2],
    cookie: u64,
) -> Result<(), i32> {
    let mut payload = payload;
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // Room for one SCM_RIGHTS header and one fd, aligned like cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(mem::size_of::<RawFd>() as u32) } as usize;
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `control`, which is at least `space`
    // bytes, so the first header and its data lie inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: `msg` and everything it points to live across the call.
    unsafe {
        with_cookie(
            libc::SYS_sendmsg,
            sock as usize,
            &msg as *const libc::msghdr as usize,
            libc::MSG_NOSIGNAL as usize,
            cookie,
        )
    }
    .map(|_| ())
}

/// Writes `bytes` to `fd` with `cookie` in the sixth argument.
pub fn write_with_cookie(fd: RawFd, bytes: &[u8], cookie: u64) -> Result<usize, i32> {
    // SAFETY: the buffer is valid for `bytes.len()` bytes.
    unsafe {
        with_cookie(
            libc::SYS_write,
            fd as usize,
            bytes.as_ptr() as usize,
            bytes.len(),
            cookie,
        )
    }
}

/// Reads into `buf` from `fd` with `cookie` in the sixth argument.
pub fn read_with_cookie(fd: RawFd, buf: &mut [u8], cookie: u64) -> Result<usize, i32> {
    // SAFETY: the buffer is valid for writes of `buf.len()` bytes.
    unsafe {
        with_cookie(
            libc::SYS_read,
            fd as usize,
            buf.as_mut_ptr() as usize,
            buf.len(),
            cookie,
        )
    }
}

/// How long a launch handshake spins before it sleeps. On the 2-vCPU VMs
/// this runs on, waking a sleeping task on an idle vCPU costs 100–500 µs,
/// more than the work being waited for (the child installs its filter in
/// ~90 µs; the parent starts the supervisor in ~70 µs). Each party yields
/// the CPU between polls, so spinning costs nothing when both share one.
pub const HANDSHAKE_SPIN: std::time::Duration = std::time::Duration::from_micros(1500);

/// Reads one message into `buf` like [`read_with_cookie`], but spins
/// (non-blocking reads and `sched_yield`) for up to [`HANDSHAKE_SPIN`]
/// before sleeping. Raw syscalls and the vDSO clock only.
pub fn read_spinning_with_cookie(fd: RawFd, buf: &mut [u8], cookie: u64) -> Result<usize, i32> {
    let (fcntl, fd_arg) = (libc::SYS_fcntl, fd as usize);
    // SAFETY (fcntl and sched_yield below): integer arguments only.
    let Ok(flags) = (unsafe { with_cookie(fcntl, fd_arg, libc::F_GETFL as usize, 0, cookie) })
    else {
        return read_with_cookie(fd, buf, cookie);
    };
    let set_flags =
        |f: usize| unsafe { with_cookie(fcntl, fd_arg, libc::F_SETFL as usize, f, cookie) };
    let _ = set_flags(flags | libc::O_NONBLOCK as usize);
    let start = monotonic_ns();
    let got = loop {
        match read_with_cookie(fd, buf, cookie) {
            Err(libc::EAGAIN) => {}
            other => break Some(other),
        }
        if monotonic_ns().saturating_sub(start) > HANDSHAKE_SPIN.as_nanos() as u64 {
            break None;
        }
        let _ = unsafe { with_cookie(libc::SYS_sched_yield, 0, 0, 0, cookie) };
    };
    let _ = set_flags(flags);
    got.unwrap_or_else(|| read_with_cookie(fd, buf, cookie))
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec; served by the
    // vDSO (no syscall, no errno on success).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// `execve` with `cookie` in the sixth argument. Returns only on failure,
/// with the errno.
pub fn execve_with_cookie(
    path: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    cookie: u64,
) -> i32 {
    // SAFETY: `argv` and `envp` are NULL-terminated arrays of pointers
    // into CStrings that the caller keeps alive.
    match unsafe {
        with_cookie(
            libc::SYS_execve,
            path.as_ptr() as usize,
            argv.as_ptr() as usize,
            envp.as_ptr() as usize,
            cookie,
        )
    } {
        Ok(_) => libc::EIO,
        Err(errno) => errno,
    }
}

/// One message on the hand-off socket.
pub struct Handoff {
    /// What kind of message it is.
    pub tag: u8,
    /// Up to four bytes after the tag.
    pub payload: [u8; 4],
    /// The fd it carried, if any.
    pub fd: Option<OwnedFd>,
}

/// Receives one message from the hand-off socket; `None` at end of stream.
pub fn recv_handoff(sock: &OwnedFd) -> io::Result<Option<Handoff>> {
    let mut payload = [0u8; 5];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control);
    // Spin first (see HANDSHAKE_SPIN), then sleep.
    let start = std::time::Instant::now();
    let n = loop {
        let spinning = start.elapsed() < HANDSHAKE_SPIN;
        let flags = libc::MSG_CMSG_CLOEXEC | if spinning { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: `msg` points at buffers that live across the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
        if n >= 0 {
            break n;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock if spinning => std::thread::yield_now(),
            _ => return Err(err),
        }
    };
    if n == 0 {
        return Ok(None);
    }
    let mut fd = None;
    // SAFETY: the kernel filled msg_control with `msg_controllen` bytes of
    // well-formed headers; the CMSG macros walk only within them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let mut rest = [0u8; 4];
    rest.copy_from_slice(&payload[1..5]);
    Ok(Some(Handoff {
        tag: payload[0],
        payload: rest,
        fd,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the subset of classic BPF our filters use over one `seccomp_data`.
    fn run(prog: &[Insn], arch: u32, nr: u32, arg5: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[56..64].copy_from_slice(&arg5.to_le_bytes());
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_le_bytes([data[k], data[k + 1], data[k + 2], data[k + 3]]);
                }
                BPF_JEQ_K => pc += if acc == i.k { i.jt } else { i.jf } as usize,
                BPF_JA => pc += i.k as usize,
                BPF_RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn targeted_syscalls_notify_and_others_are_allowed() {
        let arch = Arch::X86_64;
        let prog = build_filter(arch, &[257, 1, 74], 0xdead_beef_cafe_f00d);
        let a = arch.audit_arch();
        assert_eq!(run(&prog, a, 257, 0), RET_USER_NOTIF);
        assert_eq!(run(&prog, a, 1, 0), RET_USER_NOTIF);
        assert_eq!(run(&prog, a, 74, 7), RET_USER_NOTIF);
        assert_eq!(run(&prog, a, 0, 0), RET_ALLOW);
        assert_eq!(run(&prog, a, 2, 0), RET_ALLOW);
        assert_eq!(run(&prog, a, 0x4000_0000 | 257, 0), RET_ALLOW);
    }

    #[test]
    fn cookie_lets_the_launcher_through_and_half_a_cookie_does_not() {
        let cookie = 0x1234_5678_9abc_def0;
        let prog = build_filter(Arch::X86_64, &[1], cookie);
        let a = Arch::X86_64.audit_arch();
        assert_eq!(run(&prog, a, 1, cookie), RET_ALLOW);
        assert_eq!(run(&prog, a, 1, cookie & 0xffff_ffff), RET_USER_NOTIF);
        assert_eq!(run(&prog, a, 1, cookie & !0xffff_ffff), RET_USER_NOTIF);
    }

    #[test]
    fn foreign_abi_is_allowed() {
        let prog = build_filter(Arch::X86_64, &[5], 1);
        assert_eq!(run(&prog, 0x4000_0003, 5, 0), RET_ALLOW);
    }

    #[test]
    fn every_syscall_of_the_table_fits_in_one_filter() {
        let arch = Arch::X86_64;
        let nrs: Vec<u32> = arch
            .all_names()
            .iter()
            .filter_map(|n| arch.number(n))
            .collect();
        let prog = build_filter(arch, &nrs, 9);
        for nr in &nrs {
            assert_eq!(
                run(&prog, arch.audit_arch(), *nr, 0),
                RET_USER_NOTIF,
                "nr {nr}"
            );
        }
        assert_eq!(run(&prog, arch.audit_arch(), 100_000, 0), RET_ALLOW);
    }
}
