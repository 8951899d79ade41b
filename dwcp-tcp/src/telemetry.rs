//! `TCP_INFO` sampling: what the kernel knows about each stream (delivery rate, RTT, retransmits,
//! congestion window, bytes not yet sent). The engine samples every stream periodically and publishes
//! the samples as metrics; the stream-count controller and the scheduler read them.

use std::net::TcpStream;
use std::os::fd::AsRawFd;

use dwcp_core::error::Error;

/// One `TCP_INFO` reading of a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct TcpSample {
    /// Smoothed round-trip time, seconds.
    pub rtt_s: f64,
    /// Smallest round-trip time seen on the connection, seconds.
    pub min_rtt_s: f64,
    /// The kernel's most recent delivery-rate estimate, bytes per second.
    pub delivery_rate_bps: f64,
    /// Segments retransmitted over the connection's life.
    pub total_retransmits: u64,
    /// Congestion window, segments.
    pub cwnd_segments: u32,
    /// Maximum segment size for sending, bytes.
    pub mss: u32,
    /// Bytes written by the application that the kernel has not sent yet.
    pub unsent_bytes: u64,
    /// Bytes the peer acknowledged over the connection's life.
    pub bytes_acked: u64,
}

/// Reads `TCP_INFO` from a connected stream.
pub fn sample(stream: &TcpStream) -> Result<TcpSample, Error> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable, zero-initialised buffer of `len` bytes that outlives the call, and
    // `len` points to its size; the kernel writes at most `len` bytes and stores the length it wrote.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "reading TCP_INFO",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: every field of `tcp_info` is a plain integer, so the zeroed bytes (and whatever prefix the
    // kernel filled in) form a valid value.
    let info = unsafe { info.assume_init() };
    Ok(TcpSample {
        rtt_s: f64::from(info.tcpi_rtt) / 1e6,
        min_rtt_s: f64::from(info.tcpi_min_rtt) / 1e6,
        delivery_rate_bps: info.tcpi_delivery_rate as f64,
        total_retransmits: u64::from(info.tcpi_total_retrans),
        cwnd_segments: info.tcpi_snd_cwnd,
        mss: info.tcpi_snd_mss,
        unsent_bytes: u64::from(info.tcpi_notsent_bytes),
        bytes_acked: info.tcpi_bytes_acked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_loopback_transfer_shows_up_in_tcp_info() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut total = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut buf).unwrap() {
                    0 => return total,
                    n => total += n,
                }
            }
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let data = vec![7u8; 4 << 20];
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(reader.join().unwrap(), data.len());
        let t = sample(&s).unwrap();
        // Everything was delivered and acknowledged before the reader saw the end of the stream.
        assert!(t.bytes_acked >= data.len() as u64, "{t:?}");
        assert!(t.mss > 0 && t.cwnd_segments > 0, "{t:?}");
        assert!(t.rtt_s > 0.0 && t.rtt_s < 1.0, "{t:?}");
        assert_eq!(t.unsent_bytes, 0, "{t:?}");
    }
}
