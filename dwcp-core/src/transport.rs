//! What the engine needs from a transport: reliable, ordered byte streams to one peer.
//!
//! The migration engine (`dwcp`) speaks frames over [`Conn`]s. TCP streams implement it directly
//! (`dwcp-tcp`); RDMA queue pairs implement it in `dwcp-rdma`. A [`Connector`] opens new connections to
//! the peer (the source side), an [`Acceptor`] hands out the connections peers open (the destination
//! side). Authentication happens above this layer, on every connection, so a transport only moves bytes.

use std::fmt::Debug;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use crate::error::Error;

/// One reliable, ordered, bidirectional byte stream.
///
/// A connection is used by two threads at once: one reads (through a handle from
/// [`try_clone_conn`](Conn::try_clone_conn)) while another writes. Time-outs apply to blocking reads
/// and writes and surface as [`io::ErrorKind::WouldBlock`] or [`io::ErrorKind::TimedOut`].
pub trait Conn: Read + Write + Send + Sync + Debug {
    /// A second handle to the same connection.
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>>;
    /// Shuts one or both directions down; blocked readers and writers of every handle return.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// Limit on one blocking read (`None`: wait forever).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Limit on one blocking write (`None`: wait forever).
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// The peer's address, for logs.
    fn peer_addr(&self) -> io::Result<SocketAddr>;
    /// Short transport name for logs and reports (`"tcp"`, `"rdma"`).
    fn transport(&self) -> &'static str;
    /// The TCP socket underneath, if this is one (for `TCP_INFO` telemetry); `None` otherwise.
    fn as_tcp(&self) -> Option<&std::net::TcpStream> {
        None
    }
}

/// Opens connections to one peer.
pub trait Connector: Send + Sync + Debug {
    /// A new connection to the peer, established within `timeout`.
    fn connect(&self, timeout: Duration) -> Result<Box<dyn Conn>, Error>;
    /// The peer's address, for logs and for pooling connections per peer.
    fn peer(&self) -> SocketAddr;
}

/// Hands out the connections peers open to us.
pub trait Acceptor: Send + Sync + Debug {
    /// The next connection, waiting at most `timeout`; `Ok(None)` when none arrived in time.
    fn accept_timeout(&self, timeout: Duration) -> Result<Option<Box<dyn Conn>>, Error>;
    /// The address peers connect to.
    fn local_addr(&self) -> Result<SocketAddr, Error>;
}

impl Conn for std::net::TcpStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        std::net::TcpStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, timeout)
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        std::net::TcpStream::peer_addr(self)
    }
    fn transport(&self) -> &'static str {
        "tcp"
    }
    fn as_tcp(&self) -> Option<&std::net::TcpStream> {
        Some(self)
    }
}

/// Reads through a boxed connection (so a `BufReader<Box<dyn Conn>>` works).
impl Conn for Box<dyn Conn> {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        (**self).try_clone_conn()
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        (**self).shutdown(how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout(timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_write_timeout(timeout)
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        (**self).peer_addr()
    }
    fn transport(&self) -> &'static str {
        (**self).transport()
    }
    fn as_tcp(&self) -> Option<&std::net::TcpStream> {
        (**self).as_tcp()
    }
}
