//! One agent per interface. Two agents on one interface would each write their own config
//! into the same pinned maps, and the first to stop would detach the program the other still
//! reports attached. The API socket does not guard it: each agent may be given its own.
//!
//! The claim is an abstract Unix socket named for the interface, bound for the agent's life.
//! Abstract names live in the network namespace, as interface names do; they need no file (no
//! directory to own, nothing left behind), and the kernel releases one when its process dies,
//! however it dies (`kill -9` included), so a restarted agent takes it at once.

use std::os::{
    linux::net::SocketAddrExt as _,
    unix::net::{SocketAddr, UnixListener},
};

use anyhow::Context as _;

/// Held for the agent's life (see the module docs).
pub struct InterfaceClaim {
    _socket: UnixListener,
}

impl InterfaceClaim {
    /// Claims `iface` in this network namespace, or says which agent holds it.
    pub fn take(iface: &str) -> anyhow::Result<InterfaceClaim> {
        let name = format!("limiter-agent/{iface}");
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .with_context(|| format!("naming the abstract socket @{name}"))?;
        match UnixListener::bind_addr(&addr) {
            Ok(socket) => Ok(InterfaceClaim { _socket: socket }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
                "another limiter agent runs on {iface} in this network namespace (it holds the \
                 abstract socket @{name}): stop it first; two agents on one interface would \
                 overwrite each other's maps, and the first to stop would detach both"
            ),
            Err(e) => Err(e).with_context(|| format!("binding the abstract socket @{name}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_is_claimed_once_until_its_claim_is_dropped() {
        let iface = format!("claimtest{}", std::process::id());
        let first = InterfaceClaim::take(&iface).expect("free");
        let e = InterfaceClaim::take(&iface).err().expect("held");
        assert!(
            e.to_string()
                .contains(&format!("another limiter agent runs on {iface}")),
            "{e}"
        );
        let other = InterfaceClaim::take(&format!("{iface}x")).expect("another interface");
        drop(first);
        InterfaceClaim::take(&iface).expect("released");
        drop(other);
    }
}
