//! Namespaces for the target: user, mount, and (when asked) network.

#[allow(unused_imports)]
use super::*;
use crate::wire::Isolation;

/// Puts the calling process in new user and mount (and, if asked, network)
/// namespaces. Must run before the process starts any thread: the kernel
/// refuses a new user namespace otherwise. The PID namespace comes later,
/// with the target itself ([`ChildSpec::in_new_pid_namespace`]).
pub fn isolate(isolation: Isolation) -> Result<(), LaunchError> {
    if !isolation.namespaces {
        return Ok(());
    }
    let fail = |step, source| LaunchError::Isolation { step, source };
    // SAFETY: getuid/getgid/geteuid have no preconditions.
    let (uid, gid, euid) = unsafe { (libc::getuid(), libc::getgid(), libc::geteuid()) };
    // The user namespace only buys the privilege to create the others. Root
    // has it already, and skipping it keeps real ids, so a target can still
    // switch to another account (`service(user=...)`); inside a user
    // namespace that maps only root, setuid(postgres) fails with EINVAL.
    let user_namespace = euid != 0;
    let mut flags = libc::CLONE_NEWNS;
    if user_namespace {
        flags |= libc::CLONE_NEWUSER;
    }
    if isolation.network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare takes flags by value.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(fail("unshare", io::Error::last_os_error()));
    }
    if user_namespace {
        fs::write("/proc/self/setgroups", "deny").map_err(|e| fail("write setgroups", e))?;
        fs::write("/proc/self/uid_map", format!("0 {uid} 1"))
            .map_err(|e| fail("write uid_map", e))?;
        fs::write("/proc/self/gid_map", format!("0 {gid} 1"))
            .map_err(|e| fail("write gid_map", e))?;
    }
    // SAFETY: all pointers are NULL or point at static C strings.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail("make mounts private", io::Error::last_os_error()));
    }
    if isolation.network {
        loopback_up().map_err(|e| fail("bring up loopback", e))?;
    }
    Ok(())
}

/// Brings up `lo` in the current network namespace, so a target can still
/// talk to itself (a server and its own health probe, say).
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket takes plain integers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned here.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid; the name fits in IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
