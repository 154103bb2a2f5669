//! Binding the listening socket of every confab process.
//!
//! `std::net::TcpListener::bind` listens with a backlog of 128: a reconnect storm of thousands
//! of clients overflows that accept queue, and every dropped SYN costs its client a one-second
//! retransmission. confab listens with a backlog the kernel caps at `net.core.somaxconn`.

use std::net::{SocketAddr, TcpListener};

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections the kernel may queue before `accept`.
const BACKLOG: i32 = 4096;

/// Binds `addr` with address reuse (a restarted process gets its port back at once) and a
/// deep accept queue.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("creating the listening socket")?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    socket
        .listen(BACKLOG)
        .with_context(|| format!("listening on {addr}"))?;
    Ok(socket.into())
}
