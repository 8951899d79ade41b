//! Several sessions on one listener: which running session a joining stream belongs to.
//!
//! Every running session registers the channel its driver reads; whichever thread accepted a
//! connection (the listener's own accept loop, or any session's acceptor) hands an authenticated
//! stream to the session it names, or to the listener as the opener of a new session. A stream
//! naming a session that is not running here is refused in the handshake.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use dwcp_core::error::{Error, HandshakeError};
use dwcp_core::frame::MAX_PAYLOAD;
use dwcp_core::handshake::{Negotiated, new_session_id};
use dwcp_core::messages::JoinMessage;

use super::apply::{Event, SharedWriter};
use crate::session::{StreamReader, StreamWriter, report_error};

/// The running sessions of one listener, by id. Cheap to clone.
#[derive(Clone, Default)]
pub(super) struct Sessions(Arc<Mutex<HashMap<u64, Running>>>);

/// Where a running session's streams go, and the address that opened it.
type Running = (Sender<Event>, Option<IpAddr>);

/// Where an authenticated stream went.
pub(super) enum Routed {
    /// To the running session it joins (or dropped, the session having ended).
    Joined,
    /// It opens a new session: the caller takes it.
    Opener(Negotiated, StreamReader, StreamWriter),
}

/// A running session's registration; dropping it ends the routing of streams to the session.
pub(super) struct Registration {
    sessions: Sessions,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sessions.0.lock().remove(&self.id);
    }
}

impl Sessions {
    /// Routes streams naming `id` to `tx` until the registration is dropped.
    pub(super) fn register(
        &self,
        id: u64,
        tx: Sender<Event>,
        peer: Option<IpAddr>,
    ) -> Registration {
        self.0.lock().insert(id, (tx, peer));
        Registration {
            sessions: self.clone(),
            id,
        }
    }

    /// Running sessions.
    pub(super) fn len(&self) -> usize {
        self.0.lock().len()
    }

    /// Running sessions, and those of them opened from `peer`.
    pub(super) fn count(&self, peer: IpAddr) -> (usize, usize) {
        let sessions = self.0.lock();
        let from_peer = sessions.values().filter(|(_, p)| *p == Some(peer)).count();
        (sessions.len(), from_peer)
    }

    /// The handshake's decision on the session a stream asks for: 0 opens a new one, a running
    /// one is joined, anything else is refused.
    pub(super) fn choose(&self, requested: u64) -> Result<u64, Error> {
        if requested == 0 {
            Ok(new_session_id())
        } else if self.0.lock().contains_key(&requested) {
            Ok(requested)
        } else {
            Err(HandshakeError::UnknownSession(requested).into())
        }
    }

    /// Hands an authenticated stream to the session it joined, or back as a new session's opener
    /// (`opens`: its handshake asked for a new session). A stream that asked to join a session
    /// which ended since its handshake is told so and dropped.
    pub(super) fn route(
        &self,
        neg: Negotiated,
        reader: StreamReader,
        mut writer: StreamWriter,
        io_timeout: Duration,
        opens: bool,
    ) -> Routed {
        if opens {
            return Routed::Opener(neg, reader, writer);
        }
        let target = self.0.lock().get(&neg.session_id).map(|(tx, _)| tx.clone());
        let Some(tx) = target else {
            let e = Error::Handshake(HandshakeError::UnknownSession(neg.session_id));
            report_error(&mut writer, &e);
            return Routed::Joined;
        };
        let conn = writer.get_ref();
        let _ = conn.set_read_timeout(Some(io_timeout));
        let _ = conn.set_write_timeout(Some(io_timeout));
        // A session that ended since the lookup drops the stream with its channel.
        let _ = tx.send(Event::Joined(neg.stream_index, reader, writer, false));
        Routed::Joined
    }

    /// Hands a parked stream that asked to join a session to that session, or refuses it.
    pub(super) fn route_parked(
        &self,
        (join, mut reader, writer): (JoinMessage, StreamReader, SharedWriter),
        io_timeout: Duration,
    ) {
        let target = self
            .0
            .lock()
            .get(&join.session_id)
            .map(|(tx, _)| tx.clone());
        let Some(tx) = target else {
            let e = Error::Handshake(HandshakeError::UnknownSession(join.session_id));
            report_error(&mut writer.lock(), &e);
            return;
        };
        let Ok(writer) = Arc::try_unwrap(writer).map(Mutex::into_inner) else {
            return;
        };
        reader.bind_session(join.session_id, MAX_PAYLOAD);
        for c in [reader.get_ref().get_ref(), writer.get_ref()] {
            let _ = c.set_read_timeout(Some(io_timeout));
            let _ = c.set_write_timeout(Some(io_timeout));
        }
        let _ = tx.send(Event::Joined(join.stream_index, reader, writer, true));
    }
}
