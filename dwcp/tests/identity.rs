//! The VM's identity (UUID, layout fingerprint) in the handshake of protocol version 2, and
//! sessions with peers that speak only version 1: a destination refuses another VM before any page
//! is written; a version 1 peer still migrates, with nothing checked, unless an identity is required.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use dwcp::{Listener, Migration, MigrationConfig, ReceiverConfig};
use dwcp_core::digest::memory_digest;
use dwcp_core::frame::{FrameReader, FrameType, FrameWriter};
use dwcp_core::handshake::{
    IDENTITY_VERSION, MAX_VERSION, Offer, client_handshake, server_handshake,
};
use dwcp_core::memory::{GuestRam, MemoryLayout, MemorySink, MemorySource, PAGE_SIZE};
use dwcp_core::messages::{
    DigestMessage, ErrorMessage, ExpectedIdentity, Finish, IdentityCheck, SessionInit, VmIdentity,
    VmUuid,
};
use dwcp_core::sim::ContentMix;
use dwcp_core::{Error, ErrorCode, FailureReason};
use dwcp_hde::{Codec, EncodeCounters, encode_chunk};

const VM_A: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";
const VM_B: &str = "f81d4fae-7dec-11d0-a765-00a0c91e6bf6";

fn uuid(s: &str) -> VmUuid {
    s.parse().unwrap()
}

/// The offer of the build before the identity: version 1 only.
const V1: Offer = Offer {
    min_version: 1,
    max_version: 1,
    capabilities: dwcp_core::handshake::SUPPORTED_CAPABILITIES,
};

fn expecting(vm_uuid: Option<&str>, layout: Option<&MemoryLayout>) -> ReceiverConfig {
    ReceiverConfig {
        expected_identity: ExpectedIdentity {
            vm_uuid: vm_uuid.map(uuid),
            layout_fingerprint: layout.map(MemoryLayout::fingerprint),
        },
        ..receiver_config()
    }
}

/// Destination memory that counts every write, pre-filled with a pattern nothing sends.
struct CountingSink {
    ram: GuestRam,
    writes: AtomicU64,
}

const UNTOUCHED: u8 = 0xa5;

impl CountingSink {
    fn new(layout: MemoryLayout) -> Self {
        let ram = GuestRam::anonymous(layout).unwrap();
        for p in 0..ram.layout().total_pages() {
            ram.write_page(p, &[UNTOUCHED; PAGE_SIZE]);
        }
        Self {
            ram,
            writes: AtomicU64::new(0),
        }
    }

    fn untouched(&self) -> bool {
        let mut buf = vec![0u8; PAGE_SIZE];
        (0..self.ram.layout().total_pages()).all(|p| {
            self.ram.copy_out(p, &mut buf);
            buf.iter().all(|&b| b == UNTOUCHED)
        })
    }
}

impl MemorySink for CountingSink {
    fn layout(&self) -> &MemoryLayout {
        self.ram.layout()
    }
    fn write_page(&self, page: u64, data: &[u8]) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.ram.write_page(page, data);
    }
    fn write_zero_page(&self, page: u64) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.ram.write_zero_page(page);
    }
    fn read_page(&self, page: u64, out: &mut [u8]) {
        self.ram.copy_out(page, out);
    }
}

/// What the destination thread ended with, and the sink it would have received into.
type Outcome = (Result<dwcp::ReceiveReport, Error>, CountingSink);

/// Accepts one source and receives it into a counting sink prepared for `layout` beforehand, as a
/// hypervisor with the VM's memory already allocated would.
fn receive_counted(l: Listener, layout: MemoryLayout) -> std::thread::JoinHandle<Outcome> {
    std::thread::spawn(move || {
        let sink = CountingSink::new(layout);
        let r = l.accept().and_then(|incoming| incoming.receive_into(&sink));
        (r, sink)
    })
}

fn migrate(
    addr: SocketAddr,
    g: &dwcp_core::sim::SimulatedGuest,
    vm_uuid: Option<&str>,
) -> Result<dwcp::MigrationReport, Error> {
    let mut m = Migration::new(addr, plain(1)).config(MigrationConfig {
        streams: 2,
        max_streams: 2,
        ..source_config()
    });
    if let Some(u) = vm_uuid {
        m = m.vm_uuid(uuid(u));
    }
    m.run(g, &mut g.dirty_log(), &mut g.control())
}

fn assert_identity_refused(e: &Error, what: &str, expected: &str, announced: &str) {
    match e {
        Error::Identity {
            what: w,
            expected: x,
            announced: a,
        } => {
            assert_eq!(*w, what, "{e}");
            assert!(x.contains(expected), "{e}");
            assert!(a.contains(announced), "{e}");
        }
        other => panic!("not an identity refusal: {other}"),
    }
}

/// The source is told with the Identity code, and its error names both values.
fn assert_source_told(e: &Error, expected: &str, announced: &str) {
    match e {
        Error::Peer {
            code: ErrorCode::Identity,
            message,
        } => {
            assert!(
                message.contains(expected) && message.contains(announced),
                "{message}"
            );
        }
        other => panic!("the source was not told of the identity refusal: {other}"),
    }
    assert_eq!(e.reason(), FailureReason::Identity);
    assert!(e.to_string().contains("VM identity refused"), "{e}");
}

#[test]
fn another_vm_is_refused_before_any_page_is_written() {
    let g = guest(2 << 20, ContentMix::RANDOM, 1);
    let (l, addr) = listener(expecting(Some(VM_A), None));
    let rx = receive_counted(l, g.layout().clone());
    let err = migrate(addr, &g, Some(VM_B)).unwrap_err();
    assert_source_told(&err, VM_A, VM_B);
    let (received, sink) = rx.join().unwrap();
    assert_identity_refused(&received.unwrap_err(), "VM UUID", VM_A, VM_B);
    assert_eq!(sink.writes.load(Ordering::Relaxed), 0, "a page was written");
    assert!(sink.untouched(), "the destination memory changed");

    // A source that announces no UUID at all is refused the same way.
    let (l, addr) = listener(expecting(Some(VM_A), None));
    let rx = receive_counted(l, g.layout().clone());
    let err = migrate(addr, &g, None).unwrap_err();
    assert_source_told(&err, VM_A, "no UUID");
    let (received, sink) = rx.join().unwrap();
    assert!(matches!(received, Err(Error::Identity { .. })));
    assert!(sink.untouched());
}

#[test]
fn the_expected_vm_is_verified_and_says_so_in_both_reports() {
    let g = guest(2 << 20, ContentMix::IDLE_GUEST, 2);
    let (l, addr) = listener(expecting(Some(VM_A), Some(g.layout())));
    let rx = receive_counted(l, g.layout().clone());
    let sent = migrate(addr, &g, Some(VM_A)).unwrap();
    let (received, sink) = rx.join().unwrap();
    let received = received.unwrap();
    assert!(sent.identity_announced);
    assert_eq!(received.identity, IdentityCheck::Verified);
    assert_eq!(sent.digest, received.digest);
    assert_same_memory(&*g, &sink.ram);
}

#[test]
fn incoming_require_checks_per_migration_and_reports_what_was_announced() {
    let g = guest(1 << 20, ContentMix::IDLE_GUEST, 3);
    let layout = g.layout().clone();
    let (l, addr) = listener(receiver_config());
    let rx = std::thread::spawn(move || {
        let sink = CountingSink::new(layout.clone());
        let incoming = l.accept().unwrap();
        assert_eq!(incoming.protocol_version(), IDENTITY_VERSION);
        assert_eq!(
            incoming.identity().copied(),
            Some(VmIdentity::of(&layout, Some(uuid(VM_B))))
        );
        let refused = incoming
            .require(&ExpectedIdentity {
                vm_uuid: Some(uuid(VM_A)),
                layout_fingerprint: None,
            })
            .map(|_| ())
            .unwrap_err();
        (refused, sink)
    });
    let err = migrate(addr, &g, Some(VM_B)).unwrap_err();
    assert_source_told(&err, VM_A, VM_B);
    let (refused, sink) = rx.join().unwrap();
    assert_identity_refused(&refused, "VM UUID", VM_A, VM_B);
    assert!(sink.untouched());

    // Nothing required: the identity travelled and was only checked against its layout.
    let (l, addr) = listener(receiver_config());
    let rx = receive_counted(l, g.layout().clone());
    let sent = migrate(addr, &g, None).unwrap();
    let received = rx.join().unwrap().0.unwrap();
    assert!(sent.identity_announced);
    assert_eq!(received.identity, IdentityCheck::Announced);
}

#[test]
fn another_memory_layout_is_refused_by_its_fingerprint() {
    let g = guest(1 << 20, ContentMix::IDLE_GUEST, 4);
    let expected = MemoryLayout::flat(2 << 20).unwrap();
    let (l, addr) = listener(expecting(None, Some(&expected)));
    let rx = receive_counted(l, g.layout().clone());
    let err = migrate(addr, &g, Some(VM_A)).unwrap_err();
    let (want, got) = (
        format!("{:016x}", expected.fingerprint()),
        format!("{:016x}", g.layout().fingerprint()),
    );
    assert_source_told(&err, &want, &got);
    let (received, sink) = rx.join().unwrap();
    assert_identity_refused(&received.unwrap_err(), "layout fingerprint", &want, &got);
    assert!(sink.untouched());
}

type Reader = FrameReader<TcpStream>;
type Writer = FrameWriter<TcpStream>;

/// A hand-made source speaking `offer`: stream 0 authenticated, `init` sent, the first answer.
fn hand_source(
    addr: SocketAddr,
    offer: Offer,
    init: &[u8],
) -> (Reader, Writer, u8, (FrameType, Vec<u8>)) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = FrameReader::new(s.try_clone().unwrap());
    let mut w = FrameWriter::new(s);
    let neg = client_handshake(&mut r, &mut w, &psk(1), offer, 0, 0).unwrap();
    w.write_frame(FrameType::SessionInit, init).unwrap();
    let answer = read(&mut r);
    (r, w, neg.version, answer)
}

fn pattern(pages: u64) -> GuestRam {
    let ram = GuestRam::anonymous(MemoryLayout::flat(pages * PAGE_SIZE as u64).unwrap()).unwrap();
    for p in 0..pages {
        ram.write_page(p, &[p as u8 + 1; PAGE_SIZE]);
    }
    ram
}

/// A version 1 source (the previous build) migrating `from` over stream 0, through the commit.
fn v1_migration(r: &mut Reader, w: &mut Writer, from: &GuestRam) {
    let pages: Vec<u64> = (0..from.layout().total_pages()).collect();
    let (mut chunk, mut scratch) = (0u64.to_le_bytes().to_vec(), Vec::new());
    let mut body = Vec::new();
    encode_chunk(
        Codec::Lz4,
        0,
        &pages,
        from,
        &mut body,
        &mut scratch,
        &EncodeCounters::default(),
        None,
    )
    .unwrap();
    chunk.extend_from_slice(&body);
    w.write_frame(FrameType::Data, &chunk).unwrap();
    assert_eq!(read(r).0, FrameType::Ack);
    let finish = Finish {
        final_iteration: 0,
        data_frames: 1,
    };
    w.write_frame(FrameType::Finish, &finish.encode()).unwrap();
    let (ft, p) = read(r);
    assert_eq!(ft, FrameType::Verdict);
    let digest = memory_digest(from.layout().total_pages(), 1, &|p| {
        MemorySource::page_digest(from, p)
    });
    assert_eq!(DigestMessage::decode(&p).unwrap().digest, digest);
    w.write_frame(FrameType::Commit, &DigestMessage { digest }.encode())
        .unwrap();
    assert_eq!(read(r).0, FrameType::CommitAck);
    w.write_frame(FrameType::Close, &[]).unwrap();
}

#[test]
fn a_version_1_source_migrates_with_nothing_checked() {
    let from = pattern(4);
    let layout = from.layout().clone();
    let (l, addr) = listener(receiver_config());
    let rx = receive_counted(l, layout.clone());
    let init = SessionInit::new(layout.clone(), 1, 1, Some(uuid(VM_A)));
    assert_eq!(
        init.identity, None,
        "version 1 has no room for the identity"
    );
    let (mut r, mut w, version, answer) = hand_source(addr, V1, &init.encode());
    assert_eq!(
        version, 1,
        "the destination speaks the source's older version"
    );
    assert_eq!(answer.0, FrameType::SessionReady);
    v1_migration(&mut r, &mut w, &from);
    let (received, sink) = rx.join().unwrap();
    let received = received.unwrap();
    assert_eq!(received.identity, IdentityCheck::NotAnnounced);
    assert_eq!(received.pages_applied, 4);
    assert_same_memory(&from, &sink.ram);
}

#[test]
fn a_version_1_source_is_refused_when_an_identity_is_required() {
    let from = pattern(4);
    let layout = from.layout().clone();
    let (l, addr) = listener(expecting(Some(VM_A), None));
    let rx = receive_counted(l, layout.clone());
    let init = SessionInit::new(layout.clone(), 1, 1, None).encode();
    let (_r, _w, version, (ft, p)) = hand_source(addr, V1, &init);
    assert_eq!(version, 1);
    assert_eq!(ft, FrameType::Error, "the session was not refused");
    let m = ErrorMessage::decode(&p).unwrap();
    assert_eq!(m.code, ErrorCode::Identity);
    assert!(
        m.message.contains(VM_A) && m.message.contains("protocol version 1"),
        "{}",
        m.message
    );
    let (received, sink) = rx.join().unwrap();
    assert_identity_refused(
        &received.unwrap_err(),
        "VM UUID",
        VM_A,
        "protocol version 1",
    );
    assert!(sink.untouched());

    // An expected layout can still be checked: the announced layout is there in version 1 too.
    let (l, addr) = listener(expecting(None, Some(&layout)));
    let rx = receive_counted(l, layout.clone());
    let (mut r, mut w, _, answer) = hand_source(addr, V1, &init);
    assert_eq!(answer.0, FrameType::SessionReady);
    v1_migration(&mut r, &mut w, &from);
    assert_eq!(
        rx.join().unwrap().0.unwrap().identity,
        IdentityCheck::NotAnnounced
    );
}

#[test]
fn a_fingerprint_that_is_not_that_of_the_announced_layout_is_refused() {
    let layout = MemoryLayout::flat(4 * PAGE_SIZE as u64).unwrap();
    let (l, addr) = listener(receiver_config());
    let rx = receive_counted(l, layout.clone());
    let mut init = SessionInit::new(layout.clone(), 1, MAX_VERSION, Some(uuid(VM_A)));
    let lie = layout.fingerprint() ^ 0xff;
    init.identity.as_mut().unwrap().layout_fingerprint = lie;
    let (_r, _w, version, (ft, p)) = hand_source(addr, Offer::default(), &init.encode());
    assert_eq!(version, MAX_VERSION);
    assert_eq!(ft, FrameType::Error);
    assert_eq!(ErrorMessage::decode(&p).unwrap().code, ErrorCode::Identity);
    let (received, sink) = rx.join().unwrap();
    assert_identity_refused(
        &received.unwrap_err(),
        "layout fingerprint",
        &format!("{:016x}", layout.fingerprint()),
        &format!("{lie:016x}"),
    );
    assert!(sink.untouched());
}

/// The new source against the previous build's destination: it negotiates version 1 and sends the
/// version 1 SessionInit, which a version 1 decoder takes byte for byte (the identity is left out).
#[test]
fn a_new_source_speaks_version_1_to_a_version_1_destination() {
    let g = guest(1 << 20, ContentMix::IDLE_GUEST, 5);
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let (s, _) = server.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = FrameReader::new(s.try_clone().unwrap());
        let mut w = FrameWriter::new(s);
        let neg = server_handshake(&mut r, &mut w, &psk(1), V1, |_| Ok(7)).unwrap();
        let (ft, p) = read(&mut r);
        assert_eq!(ft, FrameType::SessionInit);
        let init = SessionInit::decode(&p);
        // Ends the session here: what matters is what the new source sent.
        let end = ErrorMessage {
            code: ErrorCode::Internal,
            message: "the test destination stops here".into(),
        };
        w.write_frame(FrameType::Error, &end.encode()).unwrap();
        (neg.version, init)
    });
    let err = migrate(addr, &g, Some(VM_A)).unwrap_err();
    assert!(
        matches!(&err, Error::Peer { code: ErrorCode::Internal, message } if message.contains("stops here")),
        "{err}"
    );
    let (version, init) = dest.join().unwrap();
    assert_eq!(version, 1);
    let init = init.expect("a version 1 destination decodes the new source's SessionInit");
    assert_eq!(&init.layout, g.layout());
    assert_eq!(init.identity, None);
}

/// A session opened on a stream parked by an earlier one carries the identity too (both ends keep
/// the version the parked stream negotiated).
#[test]
fn a_pooled_session_carries_the_identity() {
    let (l, addr) = listener(expecting(Some(VM_A), None));
    let relay = CuttingProxy::start(addr);
    let rx = std::thread::spawn(move || {
        (0..2)
            .map(|_| {
                let incoming = l.accept()?;
                let ram = GuestRam::anonymous(incoming.layout().clone()).unwrap();
                incoming.receive_into(&ram)
            })
            .collect::<Vec<_>>()
    });
    let pool = dwcp::ConnectionPool::new(Duration::from_secs(30));
    for seed in [6, 7] {
        let g = guest(1 << 20, ContentMix::IDLE_GUEST, seed);
        let sent = Migration::new(relay.addr(), plain(1))
            .connection_pool(pool.clone())
            .config(MigrationConfig {
                streams: 1,
                max_streams: 1,
                ..source_config()
            })
            .vm_uuid(uuid(VM_A))
            .run(&*g, &mut g.dirty_log(), &mut g.control())
            .unwrap();
        assert!(sent.identity_announced);
        assert_eq!(pool.idle_streams(), 1, "the stream was parked");
    }
    assert_eq!(
        relay.accepted(),
        1,
        "the second session did not reuse the parked stream"
    );
    for r in rx.join().unwrap() {
        assert_eq!(r.unwrap().identity, IdentityCheck::Verified);
    }
}
