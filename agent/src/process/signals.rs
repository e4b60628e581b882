//! Signals: forwarding, the wake-up signal that interrupts a blocked
//! receive, and pidfds.

#[allow(unused_imports)]
use super::*;

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn kill(pid: i32, signal: i32) {
    // SAFETY: kill takes plain integers.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A set of signals handled by a dedicated thread rather than by handlers.
pub struct SignalSet {
    set: libc::sigset_t,
}

impl SignalSet {
    /// Blocks `signals` in the calling thread; threads started afterwards
    /// inherit the mask, so only [`SignalSet::wait`] sees them.
    pub fn block(signals: &[i32]) -> io::Result<SignalSet> {
        // SAFETY: sigset manipulation on a local, then sigprocmask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in signals {
                libc::sigaddset(&mut set, *s);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SignalSet { set })
        }
    }

    /// Waits for one of the blocked signals. Returns it, and whether a
    /// process sent it explicitly (`kill`) rather than the kernel (a
    /// terminal's Ctrl-C, which already reached the whole process group).
    pub fn wait(&self) -> (i32, bool) {
        loop {
            // SAFETY: sigwaitinfo reads the set and fills the siginfo.
            let (sig, info) = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                (libc::sigwaitinfo(&self.set, &mut info), info)
            };
            if sig > 0 {
                return (sig, info.si_code <= 0);
            }
        }
    }
}

/// The signal used to interrupt a thread blocked in a notification RECV.
pub const WAKE_SIGNAL: i32 = libc::SIGUSR2;

extern "C" fn on_wake(_: libc::c_int) {}

/// Installs a no-op handler for [`WAKE_SIGNAL`] without `SA_RESTART`, so a
/// thread blocked in an ioctl returns `EINTR` when signalled.
pub fn install_wake_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler pointer and empty mask.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_wake as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(WAKE_SIGNAL, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The calling thread's handle, for [`wake_thread`].
pub fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// Interrupts the thread `thread` with [`WAKE_SIGNAL`].
pub fn wake_thread(thread: libc::pthread_t) {
    // SAFETY: pthread_kill on a thread handle that the caller keeps joinable.
    unsafe {
        libc::pthread_kill(thread, WAKE_SIGNAL);
    }
}

/// Whether `pid` has a handler for `signal` (its `SigCgt` mask in
/// `/proc/<pid>/status`). Unknown reads as "yes", the safe answer for a
/// caller deciding whether a polite signal is worth sending.
pub fn catches_signal(pid: i32, signal: i32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_none_or(|mask| mask & (1u64 << (signal - 1)) != 0)
}

/// A pidfd: signals sent through it can never hit a recycled pid.
pub struct Pidfd(OwnedFd);

impl Pidfd {
    /// Opens a pidfd for `pid`.
    pub fn open(pid: i32) -> io::Result<Pidfd> {
        // SAFETY: pidfd_open takes plain integers.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just created and is owned here.
        Ok(Pidfd(unsafe {
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32)
        }))
    }

    /// Sends `signal`; a process that already exited is not an error.
    pub fn signal(&self, signal: i32) {
        // SAFETY: pidfd_send_signal with a NULL siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}
