//! Least privilege: `--user UID[:GID]`. ferry opens what needs root (/dev/kvm, taps, disk
//! images, sockets) and then every thread becomes that user, with that group alone and no
//! capabilities. The seccomp filters allow the three calls that change credentials only
//! with exactly these ids (glibc makes each thread repeat them), so no thread can ever
//! take another identity.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::Error;

/// Whom ferry runs as once set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for User {
    type Err = String;

    /// `UID[:GID]`, numbers; without GID, the user's primary group from the password database.
    fn from_str(s: &str) -> Result<Self, String> {
        let number = |v: &str, what: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{what} {v:?} is not a number (UID[:GID])"))
        };
        let (uid, gid) = match s.split_once(':') {
            Some((u, g)) => (number(u, "user id")?, Some(number(g, "group id")?)),
            None => (number(s, "user id")?, None),
        };
        let gid = match gid {
            Some(g) => g,
            None => primary_group(uid).ok_or_else(|| {
                format!("user id {uid} has no entry in the password database: give UID:GID")
            })?,
        };
        Ok(User { uid, gid })
    }
}

fn primary_group(uid: u32) -> Option<u32> {
    // SAFETY: a zeroed passwd is a valid out-parameter; `buf` outlives the call and its
    // length is passed; getpwuid_r writes only into `pw`, `buf` and `found`.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found);
        (rc == 0 && !found.is_null()).then_some(pw.pw_gid)
    }
}

static USER: OnceLock<User> = OnceLock::new();
static DROPPED: AtomicBool = AtomicBool::new(false);

/// Sets whom [`drop_privileges`] becomes (once, before the filters are compiled).
pub(super) fn set(user: User) {
    let _ = USER.set(user);
}

/// The user ferry becomes, if one was given.
pub fn user() -> Option<User> {
    USER.get().copied()
}

/// The seccomp rules that let a thread take the configured ids and no other: setgroups
/// with one group, setresgid and setresuid with all three ids equal to it.
pub(super) fn credential_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::BackendError>
{
    let Some(u) = user() else {
        return Ok(Vec::new());
    };
    let eq = |arg, value| {
        SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(value),
        )
    };
    let all = |value: u32| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        Ok(vec![SeccompRule::new(vec![
            eq(0, value)?,
            eq(1, value)?,
            eq(2, value)?,
        ])?])
    };
    Ok(vec![
        (
            libc::SYS_setgroups,
            vec![SeccompRule::new(vec![eq(0, 1)?])?],
        ),
        (libc::SYS_setresgid, all(u.gid)?),
        (libc::SYS_setresuid, all(u.uid)?),
    ])
}

/// Gives `path` (a socket ferry bound as root) to the configured user, so that the user can
/// still use it, and remove it, once ferry runs as that user.
pub fn hand_over(path: &std::path::Path) -> Result<(), Error> {
    if DROPPED.load(Ordering::SeqCst) {
        return Ok(()); // bound as the user already
    }
    match user() {
        Some(u) => std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid)).map_err(|source| {
            Error::HandOver {
                path: path.to_path_buf(),
                uid: u.uid,
                source,
            }
        }),
        None => Ok(()),
    }
}

/// Becomes the configured user, in every thread: its group alone, then the group, then
/// the user (which clears every capability). Does nothing without one, or once done.
pub fn drop_privileges() -> Result<(), Error> {
    let Some(u) = user() else {
        return Ok(());
    };
    if DROPPED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let fail = |call: &'static str| Error::Drop {
        call,
        uid: u.uid,
        gid: u.gid,
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: plain system calls through glibc, which repeats each in every thread of the
    // process; `&u.gid` is a valid array of one gid_t for setgroups.
    unsafe {
        if libc::setgroups(1, &u.gid) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setresgid(u.gid, u.gid, u.gid) != 0 {
            return Err(fail("setresgid"));
        }
        if libc::setresuid(u.uid, u.uid, u.uid) != 0 {
            return Err(fail("setresuid"));
        }
    }
    Ok(())
}
