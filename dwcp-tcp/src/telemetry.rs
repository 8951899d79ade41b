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
    /// The delivery-rate sample was taken while the application gave the connection less than it
    /// could send: the rate is then a lower bound of what the path carries, not its capacity.
    pub app_limited: bool,
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

/// Offset of the byte holding `tcpi_delivery_rate_app_limited` (linux/tcp.h: after the seven `__u8`
/// fields up to `tcpi_snd_wscale:4, tcpi_rcv_wscale:4`).
const APP_LIMITED_BYTE: usize = 7;
const _: () = assert!(std::mem::offset_of!(libc::tcp_info, tcpi_rto) == 8);

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
    // The kernel's `tcpi_delivery_rate_app_limited` is bit 0 of the byte after the window scales
    // (offset 7); `libc::tcp_info` declares that byte as padding, so read it from the raw bytes.
    // SAFETY: `info` was zero-initialised, so all its `size_of::<tcp_info>()` bytes are initialised.
    let flags_byte = unsafe { info.as_ptr().cast::<u8>().add(APP_LIMITED_BYTE).read() };
    // SAFETY: every field of `tcp_info` is a plain integer, so the zeroed bytes (and whatever prefix the
    // kernel filled in) form a valid value.
    let info = unsafe { info.assume_init() };
    Ok(TcpSample {
        rtt_s: f64::from(info.tcpi_rtt) / 1e6,
        min_rtt_s: f64::from(info.tcpi_min_rtt) / 1e6,
        delivery_rate_bps: info.tcpi_delivery_rate as f64,
        app_limited: flags_byte & 1 == 1,
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

    #[test]
    fn the_app_limited_flag_tells_a_starved_sender_from_a_backlogged_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<usize>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 1 << 16];
            // Read exactly what the test asks for, when it asks.
            while let Ok(mut want) = go_rx.recv() {
                while want > 0 {
                    let n = s.read(&mut buf[..want.min(1 << 16)]).unwrap();
                    assert!(n > 0);
                    want -= n;
                }
                done_tx.send(()).unwrap();
            }
        });
        let mut s = TcpStream::connect(addr).unwrap();
        // A few bytes, then nothing more to send: the sender is starved.
        s.write_all(&[1u8; 1000]).unwrap();
        go_tx.send(1000).unwrap();
        done_rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let starved = sample(&s).unwrap();
        assert!(starved.app_limited, "{starved:?}");
        // Far more queued than the path takes at once (the reader holds back): the samples of what
        // the reader then takes were sent from a full queue.
        s.set_nonblocking(true).unwrap();
        let chunk = vec![2u8; 1 << 16];
        let mut queued = 0usize;
        loop {
            match s.write(&chunk) {
                Ok(n) => queued += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        s.set_nonblocking(false).unwrap();
        go_tx.send(queued / 2).unwrap();
        done_rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let backlogged = sample(&s).unwrap();
        assert!(backlogged.unsent_bytes > 0, "{backlogged:?}");
        assert!(!backlogged.app_limited, "{backlogged:?}");
        drop(go_tx);
        drop(s);
        reader.join().unwrap();
    }
}
