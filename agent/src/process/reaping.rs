//! Subreaping and waiting: how the shim learns that its target and the
//! target's descendants ended.

#[allow(unused_imports)]
use super::*;

/// Makes this process the reaper of its orphaned descendants, so it can
/// wait for them and read their memory.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called exit with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Waits for any child; `None` when there are none left.
pub fn wait_any() -> Option<(i32, ExitStatus)> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a valid int.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            let exit = if libc::WIFSIGNALED(status) {
                ExitStatus::Signal(libc::WTERMSIG(status))
            } else {
                ExitStatus::Code(libc::WEXITSTATUS(status))
            };
            return Some((pid, exit));
        }
        if errno() != libc::EINTR {
            return None;
        }
    }
}

/// Waits for the child `pid`; `None` if it is not our child.
pub fn wait_for(pid: i32) -> Option<ExitStatus> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a valid int.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            return Some(if libc::WIFSIGNALED(status) {
                ExitStatus::Signal(libc::WTERMSIG(status))
            } else {
                ExitStatus::Code(libc::WEXITSTATUS(status))
            });
        }
        if rc < 0 && errno() != libc::EINTR {
            return None;
        }
    }
}

/// The pids of the live children of `pid`.
pub fn children_of(pid: u32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Whether `pid` (a child) has exited, without reaping it.
pub fn has_exited(pid: i32) -> bool {
    // SAFETY: an all-zero siginfo is valid for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into the siginfo we own; WNOWAIT leaves the
    // child to be reaped by its waiter.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is valid to read for a CLD_* siginfo, and zero when
    // WNOHANG found nothing.
    rc == 0 && unsafe { info.si_pid() } == pid
}

/// Reaps every exited child of this process except `keep`, without
/// blocking: orphans of a target tree are reparented to the shim (the
/// subreaper), and nobody else would wait for them.
pub fn reap_orphans(keep: i32) {
    for pid in children_of(std::process::id()) {
        if pid != keep {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a valid int.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        }
    }
}
