//! The errno values a rule may inject, with the text that appears in
//! decisions (`deny(input/output error)`), and a "did you mean" helper.

/// One injectable errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno {
    /// Upper-case name, such as `EIO`.
    pub name: &'static str,
    /// The Linux number (the same on x86_64 and aarch64).
    pub number: i32,
    /// Lower-case description used in decision strings.
    pub text: &'static str,
}

macro_rules! errnos {
    ($($name:ident => $text:literal,)*) => {
        /// Every errno a rule may inject: the CLI reference's tables plus the
        /// ones its examples use (`EPIPE`) and common neighbours.
        pub const ERRNOS: &[Errno] = &[
            $(Errno { name: stringify!($name), number: libc::$name, text: $text },)*
        ];
    };
}

errnos! {
    EPERM => "operation not permitted",
    ENOENT => "no such file or directory",
    ESRCH => "no such process",
    EINTR => "interrupted system call",
    EIO => "input/output error",
    ENXIO => "no such device or address",
    E2BIG => "argument list too long",
    EBADF => "bad file descriptor",
    ECHILD => "no child processes",
    EAGAIN => "resource temporarily unavailable",
    ENOMEM => "cannot allocate memory",
    EACCES => "permission denied",
    EBUSY => "device or resource busy",
    EEXIST => "file exists",
    EXDEV => "invalid cross-device link",
    ENODEV => "no such device",
    ENOTDIR => "not a directory",
    EISDIR => "is a directory",
    EINVAL => "invalid argument",
    ENFILE => "too many open files in system",
    EMFILE => "too many open files",
    ETXTBSY => "text file busy",
    EFBIG => "file too large",
    ENOSPC => "no space left on device",
    ESPIPE => "illegal seek",
    EROFS => "read-only file system",
    EMLINK => "too many links",
    EPIPE => "broken pipe",
    EDEADLK => "resource deadlock avoided",
    ENAMETOOLONG => "file name too long",
    ENOLCK => "no locks available",
    ENOSYS => "function not implemented",
    ENOTEMPTY => "directory not empty",
    ELOOP => "too many levels of symbolic links",
    ENODATA => "no data available",
    ETIME => "timer expired",
    EPROTO => "protocol error",
    EOVERFLOW => "value too large for defined data type",
    ENOTSOCK => "socket operation on non-socket",
    EMSGSIZE => "message too long",
    EOPNOTSUPP => "operation not supported",
    EAFNOSUPPORT => "address family not supported by protocol",
    EADDRINUSE => "address already in use",
    EADDRNOTAVAIL => "cannot assign requested address",
    ENETDOWN => "network is down",
    ENETUNREACH => "network is unreachable",
    ENETRESET => "network dropped connection on reset",
    ECONNABORTED => "software caused connection abort",
    ECONNRESET => "connection reset by peer",
    ENOBUFS => "no buffer space available",
    EISCONN => "transport endpoint is already connected",
    ENOTCONN => "transport endpoint is not connected",
    ETIMEDOUT => "connection timed out",
    ECONNREFUSED => "connection refused",
    EHOSTDOWN => "host is down",
    EHOSTUNREACH => "no route to host",
    EALREADY => "operation already in progress",
    EINPROGRESS => "operation now in progress",
    ESTALE => "stale file handle",
    EDQUOT => "disk quota exceeded",
    ECANCELED => "operation canceled",
}

/// Looks up an errno by name, case-insensitively (`eio` and `EIO` both work).
pub fn lookup(name: &str) -> Option<&'static Errno> {
    let upper = name.to_ascii_uppercase();
    let upper = match upper.as_str() {
        "EWOULDBLOCK" => "EAGAIN",
        "ENOTSUP" => "EOPNOTSUPP",
        other => other,
    };
    ERRNOS.iter().find(|e| e.name == upper)
}

/// Looks up an errno by number.
pub fn by_number(number: i32) -> Option<&'static Errno> {
    // Called for every denied call: an index, not a scan of the table.
    static BY_NUMBER: std::sync::OnceLock<std::collections::HashMap<i32, &'static Errno>> =
        std::sync::OnceLock::new();
    BY_NUMBER
        .get_or_init(|| ERRNOS.iter().map(|e| (e.number, e)).collect())
        .get(&number)
        .copied()
}

/// The candidate closest to `input` by edit distance, if it is close enough
/// to be a plausible typo.
pub fn closest<'a>(input: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let input = input.to_ascii_lowercase();
    let limit = input.len().div_ceil(3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&input, &c.to_ascii_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_errno_is_known_with_its_linux_number() {
        let documented = [
            ("ENOENT", 2),
            ("EACCES", 13),
            ("EPERM", 1),
            ("EIO", 5),
            ("ENOSPC", 28),
            ("EROFS", 30),
            ("EEXIST", 17),
            ("ENOTEMPTY", 39),
            ("ENFILE", 23),
            ("EMFILE", 24),
            ("EFBIG", 27),
            ("ECONNREFUSED", 111),
            ("ECONNRESET", 104),
            ("ECONNABORTED", 103),
            ("ETIMEDOUT", 110),
            ("ENETUNREACH", 101),
            ("EHOSTUNREACH", 113),
            ("EADDRINUSE", 98),
            ("EADDRNOTAVAIL", 99),
            ("EINTR", 4),
            ("EAGAIN", 11),
            ("ENOMEM", 12),
            ("EBUSY", 16),
            ("EINVAL", 22),
            ("EPIPE", 32),
            ("ENOSYS", 38),
            ("EDEADLK", 35),
            ("ELOOP", 40),
            ("EDQUOT", 122),
            ("ENOLCK", 37),
        ];
        for (name, number) in documented {
            let errno = lookup(name).map(|e| e.number);
            assert_eq!(errno, Some(number), "{name}");
        }
    }

    #[test]
    fn lookup_is_case_insensitive_and_knows_aliases() {
        assert_eq!(lookup("eio").map(|e| e.name), Some("EIO"));
        assert_eq!(lookup("EWOULDBLOCK").map(|e| e.name), Some("EAGAIN"));
        assert_eq!(lookup("EIOO"), None);
        assert_eq!(by_number(5).map(|e| e.text), Some("input/output error"));
    }

    #[test]
    fn closest_suggests_plausible_typos_only() {
        let names = ERRNOS.iter().map(|e| e.name);
        assert_eq!(closest("EIOO", names.clone()), Some("EIO"));
        assert_eq!(closest("ECONREFUSED", names.clone()), Some("ECONNREFUSED"));
        assert_eq!(closest("banana", names), None);
    }
}
