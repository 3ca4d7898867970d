//! systemd's readiness protocol (`Type=notify`): a datagram to
//! `$NOTIFY_SOCKET`. Without systemd the variable is unset and this is a no-op.

use std::os::unix::net::UnixDatagram;

use tracing::debug;

pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        if let Some(abstract_name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = result {
        debug!(error = %e, state, "sd_notify failed");
    }
}
