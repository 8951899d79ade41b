//! TCP as a `dwcp_core::transport`: a connector that opens tuned streams to one peer, and an acceptor
//! over a listening socket.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use dwcp_core::error::Error;
use dwcp_core::transport::{Acceptor, Conn, Connector};

use crate::profile::{SocketProfile, apply, connect, listen};

/// Opens TCP streams to `peer`, each tuned with a socket profile.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    peer: SocketAddr,
    profile: SocketProfile,
}

impl TcpConnector {
    /// Streams to `peer` with `profile` applied.
    pub fn new(peer: SocketAddr, profile: SocketProfile) -> Self {
        Self { peer, profile }
    }
}

impl Connector for TcpConnector {
    fn connect(&self, timeout: Duration) -> Result<Box<dyn Conn>, Error> {
        let (stream, applied) = connect(self.peer, &self.profile, timeout)?;
        tracing::debug!(peer = %self.peer, congestion = %applied.congestion, send_buffer = applied.send_buffer, "stream connected");
        Ok(Box::new(stream))
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }
}

/// Accepts TCP streams on a listening socket, tuning each with a socket profile.
#[derive(Debug)]
pub struct TcpAcceptor {
    listener: TcpListener,
    profile: SocketProfile,
}

/// How often a waiting accept looks for a new connection.
const ACCEPT_POLL: Duration = Duration::from_millis(1);

impl TcpAcceptor {
    /// Listens on `addr` (port 0 picks a free port).
    pub fn bind(addr: SocketAddr, profile: SocketProfile) -> Result<Self, Error> {
        let listener = listen(addr, &profile)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("configuring the listener", e))?;
        Ok(Self { listener, profile })
    }
}

impl Acceptor for TcpAcceptor {
    fn accept_timeout(&self, timeout: Duration) -> Result<Option<Box<dyn Conn>>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| Error::io("configuring an accepted stream", e))?;
                    apply(&stream, &self.profile)?;
                    return Ok(Some(Box::new(stream)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    std::thread::sleep(ACCEPT_POLL);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("accepting a connection", e)),
            }
        }
    }

    fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("reading the listener address", e))
    }
}
