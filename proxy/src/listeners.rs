//! The proxy's listening sockets, bound by `main` before anything starts.
//!
//! Binding up front makes "address in use" a clear exit (64, naming the flag)
//! instead of an error inside a listener task, and tells every port before
//! serving: a listen flag given port 0 gets a free port here, which the log and
//! `--ready-file` report. The sockets are then served as they are, never released
//! and bound again, so no other process can take a port in between.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;

/// A bound, non-blocking listening socket and the address it got.
#[derive(Debug)]
pub struct Bound {
    pub socket: TcpListener,
    pub addr: SocketAddr,
}

impl Bound {
    /// Binds `addr`; the error names `flag`.
    pub fn bind(addr: SocketAddr, flag: &str) -> Result<Self, String> {
        let bound = TcpListener::bind(addr).and_then(|socket| {
            socket.set_nonblocking(true)?;
            let addr = socket.local_addr()?;
            Ok(Bound { socket, addr })
        });
        bound.map_err(|e| format!("cannot listen on {addr} ({flag}): {e}"))
    }
}

/// Every listener of the proxy, bound.
#[derive(Debug)]
pub struct Listeners {
    pub listen: Bound,
    pub admin: Bound,
    pub telemetry: Option<Bound>,
    pub inbound: Option<Bound>,
}

impl Listeners {
    /// Binds `--listen`, `--admin`, and `--telemetry` and `--inbound` when given.
    pub fn bind(
        listen: SocketAddr,
        admin: SocketAddr,
        telemetry: Option<SocketAddr>,
        inbound: Option<SocketAddr>,
    ) -> Result<Self, String> {
        Ok(Listeners {
            listen: Bound::bind(listen, "--listen")?,
            admin: Bound::bind(admin, "--admin")?,
            telemetry: telemetry
                .map(|a| Bound::bind(a, "--telemetry"))
                .transpose()?,
            inbound: inbound.map(|a| Bound::bind(a, "--inbound")).transpose()?,
        })
    }

    /// Each listener's flag name (without `--`) and bound address.
    pub fn addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut addrs = vec![("listen", self.listen.addr), ("admin", self.admin.addr)];
        addrs.extend(self.telemetry.as_ref().map(|b| ("telemetry", b.addr)));
        addrs.extend(self.inbound.as_ref().map(|b| ("inbound", b.addr)));
        addrs
    }
}

/// Writes `addrs` to `path` as one JSON object (`{"listen": "127.0.0.1:40123",
/// ...}`), atomically: a temporary file beside it, then a rename, so a reader
/// polling for the file sees all of it or nothing.
pub fn write_ready_file(path: &Path, addrs: &[(&str, SocketAddr)]) -> io::Result<()> {
    let object: serde_json::Map<String, serde_json::Value> = addrs
        .iter()
        .map(|(name, addr)| ((*name).to_owned(), addr.to_string().into()))
        .collect();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{}\n", serde_json::Value::Object(object)))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback(port: u16) -> SocketAddr {
        ([127, 0, 0, 1], port).into()
    }

    #[test]
    fn port_zero_gets_a_real_port_that_stays_bound() {
        let listeners =
            Listeners::bind(loopback(0), loopback(0), Some(loopback(0)), None).expect("bind");
        let addrs = listeners.addrs();
        let names: Vec<&str> = addrs.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["listen", "admin", "telemetry"]);
        for (name, addr) in &addrs {
            assert_ne!(addr.port(), 0, "{name}");
            // Still held: binding it again fails.
            assert!(TcpListener::bind(addr).is_err(), "{name} was released");
        }
    }

    #[test]
    fn an_address_in_use_is_refused_naming_the_flag() {
        let taken = TcpListener::bind(loopback(0)).expect("bind");
        let taken = taken.local_addr().expect("addr");
        let err = Listeners::bind(loopback(0), loopback(0), None, Some(taken)).expect_err("in use");
        assert!(
            err.starts_with(&format!("cannot listen on {taken} (--inbound): ")),
            "{err}"
        );
    }

    #[test]
    fn the_ready_file_holds_every_address_and_no_temporary_file_is_left() {
        let dir = std::env::temp_dir().join(format!("sluice-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("ready.json");
        write_ready_file(
            &path,
            &[("listen", loopback(40123)), ("admin", loopback(40124))],
        )
        .expect("write");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"listen": "127.0.0.1:40123", "admin": "127.0.0.1:40124"})
        );
        let entries: Vec<_> = std::fs::read_dir(&dir).expect("list").collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
