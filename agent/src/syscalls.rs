//! Syscall names and numbers for the architectures Faultbox supports, the
//! families a spec may name, and which argument of a syscall carries a path.
//!
//! The tables come from the `syscalls` crate, which is generated from the
//! kernel's own syscall tables, so every syscall of the architecture is
//! known (the Go implementation's hand-written table missed `faccessat`,
//! `readlinkat`, `getsockname` and others).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A CPU architecture with its own syscall numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// x86_64 (AMD64).
    X86_64,
    /// aarch64 (ARM64).
    Aarch64,
}

/// `AUDIT_ARCH_X86_64`: what `seccomp_data.arch` holds for native x86_64 syscalls.
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `AUDIT_ARCH_AARCH64`.
const AUDIT_ARCH_AARCH64: u32 = 0xC000_00B7;

impl Arch {
    /// The architecture this binary was built for.
    pub const fn native() -> Arch {
        #[cfg(target_arch = "aarch64")]
        {
            Arch::Aarch64
        }
        #[cfg(not(target_arch = "aarch64"))]
        {
            Arch::X86_64
        }
    }

    /// The value the kernel puts in `seccomp_data.arch` for this architecture.
    pub const fn audit_arch(self) -> u32 {
        match self {
            Arch::X86_64 => AUDIT_ARCH_X86_64,
            Arch::Aarch64 => AUDIT_ARCH_AARCH64,
        }
    }

    /// The syscall number for `name`, accepting the aliases Faultbox documents.
    pub fn number(self, name: &str) -> Option<u32> {
        let canonical = self.canonical_name(name)?;
        match self {
            Arch::X86_64 => syscalls::x86_64::Sysno::from_str(canonical)
                .ok()
                .map(|s| s.id() as u32),
            Arch::Aarch64 => syscalls::aarch64::Sysno::from_str(canonical)
                .ok()
                .map(|s| s.id() as u32),
        }
    }

    /// The kernel's name for syscall number `nr`.
    pub fn name(self, nr: u32) -> Option<&'static str> {
        match self {
            Arch::X86_64 => syscalls::x86_64::Sysno::new(nr as usize).map(|s| s.name()),
            Arch::Aarch64 => syscalls::aarch64::Sysno::new(nr as usize).map(|s| s.name()),
        }
    }

    /// Maps a user-facing name to the table's name: `fstatat` is called
    /// `newfstatat` on x86_64, and the other way round on aarch64.
    fn canonical_name(self, name: &str) -> Option<&str> {
        Some(match (self, name) {
            (Arch::X86_64, "fstatat") => "newfstatat",
            (Arch::Aarch64, "newfstatat") => "fstatat",
            (_, "") => return None,
            _ => name,
        })
    }

    /// Every syscall name of this architecture.
    pub fn all_names(self) -> Vec<&'static str> {
        match self {
            Arch::X86_64 => syscalls::x86_64::Sysno::iter().map(|s| s.name()).collect(),
            Arch::Aarch64 => syscalls::aarch64::Sysno::iter().map(|s| s.name()).collect(),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        })
    }
}

/// Expands a spec-level family name to the syscalls it stands for.
///
/// `write` covers every way a program writes through an fd, and so on. A
/// name that is not a family stands for itself. Names that do not exist on
/// `arch` (for example `open` on aarch64) are dropped from a family.
pub fn expand_family(arch: Arch, name: &str) -> Vec<&str> {
    let members: &[&str] = match name {
        "write" => &["write", "writev", "pwrite64", "pwritev", "pwritev2"],
        "read" => &["read", "readv", "pread64", "preadv", "preadv2"],
        "open" => &["open", "openat", "openat2", "creat"],
        "fsync" => &["fsync", "fdatasync"],
        "sendto" => &["sendto", "sendmsg", "sendmmsg"],
        "recvfrom" => &["recvfrom", "recvmsg", "recvmmsg"],
        _ => return vec![name],
    };
    members
        .iter()
        .copied()
        .filter(|m| arch.number(m).is_some())
        .collect()
}

/// Maps an operation name of `--fs-fault` to syscalls, or `None` if `op` is
/// not a filesystem operation.
///
/// `sync` also covers `fdatasync`: PostgreSQL and most WAL writers on Linux
/// use it, and a durability test that misses it silently tests nothing.
pub fn fs_operation(arch: Arch, op: &str) -> Option<Vec<&'static str>> {
    let members: &[&'static str] = match op {
        "open" => &["openat", "open", "openat2", "creat"],
        "read" => &["read", "readv"],
        "write" => &["write", "writev"],
        "sync" | "fsync" => &["fsync", "fdatasync"],
        "mkdir" => &["mkdirat", "mkdir"],
        "delete" => &["unlinkat", "unlink", "rmdir"],
        "stat" => &["newfstatat", "fstatat", "statx", "stat", "lstat"],
        _ => return None,
    };
    Some(
        members
            .iter()
            .copied()
            .filter(|m| arch.number(m).is_some() && arch.canonical_name(m) == Some(m))
            .collect(),
    )
}

/// The `--fs-fault` operation names, for error messages.
pub const FS_OPERATIONS: &[&str] = &[
    "open", "read", "write", "sync", "fsync", "mkdir", "delete", "stat",
];

/// Where a syscall's path comes from, so rules can filter on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathSource {
    /// A pointer to a NUL-terminated path in argument `path`, relative to the
    /// directory fd in argument `dirfd` (or the cwd when `dirfd` is `None`).
    Pointer {
        /// Index of the pointer argument.
        path: usize,
        /// Index of the directory fd argument, for the `*at` syscalls.
        dirfd: Option<usize>,
    },
    /// An fd in argument 0; the path is what `/proc/<pid>/fd/<fd>` names.
    Fd,
    /// A socket address (`struct sockaddr *` in argument `addr`, its length
    /// in `len`): the "path" of a `connect` is where it dials, written
    /// `ip:port` (`[ip6]:port`, or the socket's path for `AF_UNIX`), so
    /// a rule's `path` glob such as `*:5432` selects a destination.
    Sockaddr {
        /// Index of the pointer argument.
        addr: usize,
        /// Index of the length argument.
        len: usize,
    },
}

/// How the path of syscall `name` is found, or `None` if it has none.
pub fn path_source(name: &str) -> Option<PathSource> {
    let pointer = |path, dirfd| Some(PathSource::Pointer { path, dirfd });
    match name {
        "open" | "creat" | "mkdir" | "rmdir" | "unlink" | "access" | "stat" | "lstat"
        | "readlink" | "rename" | "link" | "truncate" | "chmod" | "chown" | "lchown" | "execve"
        | "mknod" | "statfs" | "chdir" | "utime" | "utimes" => pointer(0, None),
        "symlink" => pointer(1, None),
        "openat" | "openat2" | "mkdirat" | "unlinkat" | "faccessat" | "faccessat2"
        | "newfstatat" | "fstatat" | "statx" | "readlinkat" | "renameat" | "renameat2"
        | "linkat" | "fchmodat" | "fchmodat2" | "fchownat" | "utimensat" | "execveat"
        | "mknodat" | "futimesat" | "name_to_handle_at" => pointer(1, Some(0)),
        "symlinkat" => pointer(2, Some(1)),
        "write" | "writev" | "pwrite64" | "pwritev" | "pwritev2" | "read" | "readv" | "pread64"
        | "preadv" | "preadv2" | "fsync" | "fdatasync" | "ftruncate" | "fchmod" | "fchown"
        | "fallocate" | "sync_file_range" | "fstat" | "fstatfs" | "getdents" | "getdents64"
        | "close" | "lseek" | "flock" | "sendto" | "sendmsg" | "sendmmsg" | "recvfrom"
        | "recvmsg" | "recvmmsg" | "fchdir" | "fadvise64" | "fsetxattr" | "fgetxattr"
        | "syncfs" | "copy_file_range" | "sendfile" | "splice" => Some(PathSource::Fd),
        "connect" => Some(PathSource::Sockaddr { addr: 1, len: 2 }),
        _ => None,
    }
}

/// `ip:port` (or `[ip6]:port`, or an `AF_UNIX` path, `@name` when
/// abstract) of the raw bytes of a `struct sockaddr`; `None` for other
/// families or a short buffer.
pub fn describe_sockaddr(raw: &[u8]) -> Option<String> {
    let family = u16::from_ne_bytes([*raw.first()?, *raw.get(1)?]);
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match i32::from(family) {
        libc::AF_INET if raw.len() >= 8 => {
            let ip = std::net::Ipv4Addr::new(raw[4], raw[5], raw[6], raw[7]);
            Some(format!("{ip}:{}", port(raw)))
        }
        libc::AF_INET6 if raw.len() >= 24 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&raw[8..24]);
            let ip = std::net::Ipv6Addr::from(octets);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => format!("{v4}:{}", port(raw)),
                None => format!("[{ip}]:{}", port(raw)),
            })
        }
        libc::AF_UNIX if raw.len() > 2 => {
            let path = &raw[2..];
            if path[0] == 0 {
                let name: Vec<u8> = path[1..].iter().copied().take_while(|b| *b != 0).collect();
                return Some(format!("@{}", String::from_utf8_lossy(&name)));
            }
            let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
            Some(String::from_utf8_lossy(&path[..end]).into_owned())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_read_as_ip_and_port() {
        let mut v4 = vec![0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&5432u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(describe_sockaddr(&v4).as_deref(), Some("127.0.0.1:5432"));
        let mut v6 = vec![0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&53u16.to_be_bytes());
        v6[23] = 1;
        assert_eq!(describe_sockaddr(&v6).as_deref(), Some("[::1]:53"));
        v6[18..20].copy_from_slice(&[0xff, 0xff]);
        v6[20..24].copy_from_slice(&[10, 0, 0, 7]);
        assert_eq!(describe_sockaddr(&v6).as_deref(), Some("10.0.0.7:53"));
        let mut unix = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        unix.extend_from_slice(b"/run/x.sock\0junk");
        assert_eq!(describe_sockaddr(&unix).as_deref(), Some("/run/x.sock"));
        let mut abs = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        abs.extend_from_slice(b"\0name");
        assert_eq!(describe_sockaddr(&abs).as_deref(), Some("@name"));
        assert_eq!(describe_sockaddr(&v4[..5]), None);
        assert_eq!(describe_sockaddr(&[]), None);
    }

    #[test]
    fn x86_64_table_matches_libc_numbers() {
        let arch = Arch::X86_64;
        assert_eq!(arch.number("read"), Some(0));
        assert_eq!(arch.number("openat"), Some(257));
        assert_eq!(arch.number("newfstatat"), Some(262));
        assert_eq!(arch.number("fstatat"), Some(262));
        assert_eq!(arch.number("faccessat"), Some(269));
        assert_eq!(arch.number("readlinkat"), Some(267));
        assert_eq!(arch.number("getsockname"), Some(51));
        assert_eq!(arch.number("fsync"), Some(74));
        assert_eq!(arch.number("futex"), Some(202));
        assert_eq!(arch.number("nosuchcall"), None);
        assert_eq!(arch.name(257), Some("openat"));
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(arch.number("openat"), Some(libc::SYS_openat as u32));
            assert_eq!(arch.number("connect"), Some(libc::SYS_connect as u32));
            assert_eq!(arch.number("fdatasync"), Some(libc::SYS_fdatasync as u32));
        }
    }

    #[test]
    fn aarch64_table_has_generic_numbers_and_no_legacy_calls() {
        let arch = Arch::Aarch64;
        assert_eq!(arch.number("openat"), Some(56));
        assert_eq!(arch.number("futex"), Some(98));
        assert_eq!(arch.number("fstatat"), Some(79));
        assert_eq!(arch.number("newfstatat"), Some(79));
        assert_eq!(arch.number("open"), None);
    }

    #[test]
    fn families_expand_and_drop_missing_members() {
        assert_eq!(
            expand_family(Arch::X86_64, "fsync"),
            vec!["fsync", "fdatasync"]
        );
        assert!(expand_family(Arch::X86_64, "open").contains(&"open"));
        assert!(!expand_family(Arch::Aarch64, "open").contains(&"open"));
        assert_eq!(expand_family(Arch::X86_64, "connect"), vec!["connect"]);
    }

    #[test]
    fn fs_operations_map_to_existing_syscalls() {
        assert_eq!(
            fs_operation(Arch::X86_64, "write"),
            Some(vec!["write", "writev"])
        );
        assert_eq!(
            fs_operation(Arch::X86_64, "sync"),
            Some(vec!["fsync", "fdatasync"])
        );
        let stat = fs_operation(Arch::X86_64, "stat").unwrap_or_default();
        assert!(stat.contains(&"newfstatat") && !stat.contains(&"fstatat"));
        let stat = fs_operation(Arch::Aarch64, "stat").unwrap_or_default();
        assert!(stat.contains(&"fstatat") && !stat.contains(&"newfstatat"));
        assert_eq!(fs_operation(Arch::X86_64, "frobnicate"), None);
    }

    #[test]
    fn path_sources_cover_file_and_fd_syscalls() {
        assert_eq!(
            path_source("openat"),
            Some(PathSource::Pointer {
                path: 1,
                dirfd: Some(0)
            })
        );
        assert_eq!(path_source("write"), Some(PathSource::Fd));
        assert_eq!(
            path_source("connect"),
            Some(PathSource::Sockaddr { addr: 1, len: 2 })
        );
        assert_eq!(path_source("mmap"), None);
    }
}
