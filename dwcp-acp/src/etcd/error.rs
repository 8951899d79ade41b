//! etcd-client's errors as [`AcpError`]s, worded so that an operator knows what to check.

use std::time::Duration;

use etcd_client::Error;
use tonic::Code;

use crate::AcpError;

/// Maps a failed call to `endpoints` (for the message) made with the deadline `timeout`.
pub(crate) fn map(error: Error, endpoints: &str, timeout: Duration) -> AcpError {
    match error {
        Error::GRpcStatus(status) => match status.code() {
            // tonic reports its own per-request deadline as Cancelled("Timeout expired"); the
            // server reports the propagated grpc-timeout as DeadlineExceeded.
            Code::DeadlineExceeded => AcpError::Timeout(timeout),
            Code::Cancelled if status.message().contains("Timeout expired") => {
                AcpError::Timeout(timeout)
            }
            // Connection refused, no leader ("etcdserver: no leader", asked for by
            // require_leader), leader changed, request timed out inside raft: all transient.
            Code::Unavailable => AcpError::Unavailable(format!(
                "etcd at {endpoints}: {}; check that a majority of the etcd members is running \
                 and reachable from this host",
                status.message()
            )),
            Code::Unauthenticated | Code::PermissionDenied => AcpError::Backend(format!(
                "etcd at {endpoints} refused the request ({}); this backend connects without \
                 credentials: disable etcd auth or grant the anonymous user the prefix",
                status.message()
            )),
            Code::ResourceExhausted => AcpError::Backend(format!(
                "etcd at {endpoints} is out of resources ({}); if its space quota is exceeded, \
                 compact, defragment and disarm the alarm",
                status.message()
            )),
            code => AcpError::Backend(format!(
                "etcd at {endpoints}: {code:?}: {}",
                status.message()
            )),
        },
        Error::TransportError(e) => AcpError::Unavailable(format!(
            "cannot reach etcd at {endpoints}: {e}; check the endpoints and that etcd is running"
        )),
        Error::IoError(e) => AcpError::Unavailable(format!("etcd at {endpoints}: {e}")),
        Error::InvalidArgs(e) => AcpError::Invalid(format!("etcd endpoints {endpoints}: {e}")),
        Error::InvalidUri(e) => AcpError::Invalid(format!(
            "etcd endpoint in {endpoints} is not a URL ({e}); write http://host:port"
        )),
        Error::LeaseKeepAliveError(e) => {
            AcpError::Unavailable(format!("etcd lease keep-alive at {endpoints}: {e}"))
        }
        other => AcpError::Backend(format!("etcd at {endpoints}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_timeouts_and_unavailable_stays_unavailable() {
        let t = Duration::from_millis(300);
        let e = |s| map(Error::GRpcStatus(s), "http://x:1", t);
        assert_eq!(
            e(tonic::Status::deadline_exceeded("x")),
            AcpError::Timeout(t)
        );
        assert_eq!(
            e(tonic::Status::cancelled("Timeout expired")),
            AcpError::Timeout(t)
        );
        assert!(matches!(
            e(tonic::Status::unavailable("etcdserver: no leader")),
            AcpError::Unavailable(m) if m.contains("no leader") && m.contains("majority")
        ));
        assert!(matches!(
            e(tonic::Status::internal("x")),
            AcpError::Backend(_)
        ));
    }
}
