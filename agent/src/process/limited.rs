//! Running a computation in a forked copy of this process under a memory
//! limit, so that an allocation it cannot make kills the copy instead of
//! aborting the caller. Rust aborts on a failed allocation (there is no
//! stable way to turn it into an error), so a spec that asks for 16 GB in
//! one expression can only be caught from outside the process that runs
//! it.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use super::ExitStatus;

/// A page of memory shared with forked children: what a child last wrote
/// is still there after it dies.
pub struct SharedPage {
    ptr: *mut u8,
}

// SAFETY: the page is plain bytes; writes go through `write`, which
// publishes the length last, and readers copy it out.
unsafe impl Send for SharedPage {}
// SAFETY: as above.
unsafe impl Sync for SharedPage {}

const PAGE: usize = 4096;

impl SharedPage {
    /// Maps a zeroed page shared with children forked afterwards.
    pub fn new() -> io::Result<SharedPage> {
        // SAFETY: an anonymous shared mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedPage { ptr: ptr.cast() })
    }

    fn len(&self) -> &AtomicU32 {
        // SAFETY: the first 4 bytes of the page, aligned, live as long as
        // the mapping.
        unsafe { &*self.ptr.cast::<AtomicU32>() }
    }

    /// Stores `bytes` (up to a page, less the length).
    pub fn write(&self, bytes: &[u8]) {
        let n = bytes.len().min(PAGE - 4);
        // SAFETY: n bytes after the length word are inside the page.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(4), n) };
        self.len().store(n as u32, Ordering::Release);
    }

    /// What was last written.
    pub fn read(&self) -> Vec<u8> {
        let n = (self.len().load(Ordering::Acquire) as usize).min(PAGE - 4);
        // SAFETY: n bytes after the length word are inside the page.
        unsafe { std::slice::from_raw_parts(self.ptr.add(4), n) }.to_vec()
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), PAGE) };
    }
}

/// This process's address space, from `/proc/self/status` (`VmSize`).
fn address_space() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Runs `f` in a forked copy of this process whose address space may grow
/// by `budget` bytes, with its stdout and stderr sent to `/dev/null`, and
/// returns how the copy ended: exit 0 when `f` returned, 101 when it
/// panicked, a signal (SIGABRT, SIGSEGV) when it ran out of memory.
///
/// Only the calling thread exists in the copy; `f` must not wait for
/// another thread of this process.
pub fn run_limited(budget: u64, f: impl FnOnce()) -> io::Result<ExitStatus> {
    let limit = address_space().saturating_add(budget);
    // SAFETY: fork; the child runs `f` and leaves with _exit, never
    // returning into the caller's frames.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: prctl, sigprocmask, setrlimit, open and dup2 with
        // arguments we own. The copy dies with its parent, and takes the
        // signals the parent may have blocked for a watcher thread that
        // the copy does not have: a Ctrl-C while a spec loads must not
        // leave it running.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::setrlimit(libc::RLIMIT_AS, &rl);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if null >= 0 {
                libc::dup2(null, 1);
                libc::dup2(null, 2);
            }
        }
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
        // SAFETY: ends the copy without running the parent's exit handlers.
        unsafe { libc::_exit(if ok { 0 } else { 101 }) };
    }
    super::wait_for(pid).ok_or_else(|| io::Error::other("lost the forked child"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_allocates_past_its_budget_dies_and_the_caller_lives() {
        let page = SharedPage::new().expect("page");
        let status = run_limited(64 << 20, || {
            page.write(b"before the big one");
            let v: Vec<u8> = vec![1; 1 << 30];
            page.write(format!("survived {}", v.len()).as_bytes());
        })
        .expect("fork");
        assert!(matches!(status, ExitStatus::Signal(_)), "{status:?}");
        assert_eq!(page.read(), b"before the big one");
        let fine = run_limited(64 << 20, || page.write(b"done")).expect("fork");
        assert_eq!(fine, ExitStatus::Code(0));
        assert_eq!(page.read(), b"done");
    }
}
