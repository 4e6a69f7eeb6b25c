//! One agent per interface. Two agents on one interface would each write their own config
//! into the same pinned maps, and the first to stop would detach the program the other still
//! reports attached. The API socket does not guard it: each agent may be given its own.
//!
//! The claim is an abstract Unix socket named for the interface, listening for the agent's
//! life. Abstract names live in the network namespace, as interface names do; they need no file
//! (no directory to own, nothing left behind), and the kernel releases one when its process
//! dies, however it dies (`kill -9` included), so a restarted agent takes it at once.
//!
//! An abstract name has no permissions: any local process can bind it first. So a name found
//! taken refuses the start only when it is held by a listening process of this agent's own
//! user (asked of the kernel, `SO_PEERCRED`), which is what another agent is; one held by
//! another user, or not listening, is not an agent's, and the start goes on without the claim,
//! saying so. A local user cannot stop the agent from starting this way.

use std::os::{
    fd::AsRawFd as _,
    linux::net::SocketAddrExt as _,
    unix::net::{SocketAddr, UnixListener, UnixStream},
};

use anyhow::Context as _;

/// Held for the agent's life (see the module docs); `None` inside when the name was held by
/// something that is not an agent.
pub struct InterfaceClaim {
    _socket: Option<UnixListener>,
}

impl InterfaceClaim {
    /// Claims `iface` in this network namespace, or says which agent holds it.
    pub fn take(iface: &str) -> anyhow::Result<InterfaceClaim> {
        let name = format!("limiter-agent/{iface}");
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .with_context(|| format!("naming the abstract socket @{name}"))?;
        let e = match UnixListener::bind_addr(&addr) {
            Ok(socket) => {
                return Ok(InterfaceClaim {
                    _socket: Some(socket),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => e,
            Err(e) => {
                return Err(e).with_context(|| format!("binding the abstract socket @{name}"));
            }
        };
        let holder = UnixStream::connect_addr(&addr)
            .ok()
            .and_then(|stream| peer_credentials(&stream));
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        match holder {
            Some(cred) if cred.uid == me => anyhow::bail!(
                "another limiter agent (pid {}) runs on {iface} in this network namespace (it \
                 holds the abstract socket @{name}): stop it first; two agents on one interface \
                 would overwrite each other's maps, and the first to stop would detach both",
                cred.pid
            ),
            Some(cred) => tracing::warn!(
                "the abstract socket @{name} is held by pid {} of uid {}, not this agent's user: \
                 not an agent; starting without the one-agent-per-interface check",
                cred.pid,
                cred.uid
            ),
            None => tracing::warn!(
                "the abstract socket @{name} is bound but does not answer ({e}): not an agent; \
                 starting without the one-agent-per-interface check"
            ),
        }
        Ok(InterfaceClaim { _socket: None })
    }
}

/// The credentials the kernel recorded for the process at the other end of `stream`.
fn peer_credentials(stream: &UnixStream) -> Option<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals of the size given; the fd is the stream's.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (rc == 0 && len as usize == size_of::<libc::ucred>()).then_some(cred)
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd as _;

    use super::*;

    #[test]
    fn an_interface_is_claimed_once_until_its_claim_is_dropped() {
        let iface = format!("claimtest{}", std::process::id());
        let first = InterfaceClaim::take(&iface).expect("free");
        let e = InterfaceClaim::take(&iface).err().expect("held");
        assert!(
            e.to_string().contains(&format!(
                "another limiter agent (pid {}) runs on {iface}",
                std::process::id()
            )),
            "{e}"
        );
        let other = InterfaceClaim::take(&format!("{iface}x")).expect("another interface");
        drop(first);
        InterfaceClaim::take(&iface).expect("released");
        drop(other);
    }

    /// A name bound by something that does not listen (any local process can bind an abstract
    /// name first) is not an agent's: the claim goes on without it.
    #[test]
    fn a_name_held_by_what_is_not_an_agent_does_not_stop_the_start() {
        let iface = format!("squat{}", std::process::id());
        let name = format!("limiter-agent/{iface}");
        // A stream socket bound to the name and never listening (std binds only to listen).
        // SAFETY: plain socket calls on a local address struct of the size given.
        let squat = unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let mut sa: libc::sockaddr_un = std::mem::zeroed();
            sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, b) in name.bytes().enumerate() {
                sa.sun_path[i + 1] = b as libc::c_char;
            }
            let len = size_of::<libc::sa_family_t>() + 1 + name.len();
            let rc = libc::bind(fd, (&raw const sa).cast(), len as libc::socklen_t);
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            std::os::fd::OwnedFd::from_raw_fd(fd)
        };
        let claim = InterfaceClaim::take(&iface).expect("not refused");
        assert!(claim._socket.is_none());
        drop(squat);
    }
}
