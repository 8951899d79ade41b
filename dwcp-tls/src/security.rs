//! How a stream is secured: the modes, their rustls configurations, and the TLS handshake.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_core::error::{Error, SecurityError};
use dwcp_core::handshake::Psk;
use dwcp_core::transport::Conn;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::stream::TlsConn;

/// The exporter label of the value that binds the DWCP handshake to its TLS session.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-dwcp-stream-handshake";
/// Bytes a TLS handshake may read per system call.
const HANDSHAKE_CHUNK: usize = 16 << 10;

/// Which protection a [`Security`] gives its streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum SecurityMode {
    /// TLS 1.3, both ends present certificates of one CA; the server's must name the address or
    /// host the client dialled.
    #[serde(rename = "tls-certificates")]
    Certificates,
    /// TLS 1.3 encryption; both ends prove the pre-shared key inside the TLS session.
    #[serde(rename = "tls-psk")]
    PreSharedKey,
    /// No encryption: the pre-shared key authenticates each stream, pages cross the network in clear
    /// text. Only by explicit choice (`--insecure-plaintext`).
    #[serde(rename = "insecure-plaintext")]
    InsecurePlaintext,
}

impl SecurityMode {
    /// Whether streams are encrypted.
    pub fn is_encrypted(self) -> bool {
        !matches!(self, SecurityMode::InsecurePlaintext)
    }

    /// A short name for reports, logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            SecurityMode::Certificates => "tls-certificates",
            SecurityMode::PreSharedKey => "tls-psk",
            SecurityMode::InsecurePlaintext => "insecure-plaintext",
        }
    }
}

impl fmt::Display for SecurityMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How every stream of an endpoint is protected. Cheap to clone.
#[derive(Clone)]
pub struct Security(Arc<Inner>);

enum Inner {
    Tls {
        mode: SecurityMode,
        /// `None` in certificate mode: the stream handshake key is the exporter value itself.
        psk: Option<Psk>,
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        server_name: Option<ServerName<'static>>,
        fingerprint: u64,
    },
    Plaintext(Psk),
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Security({})", self.mode())
    }
}

/// A pre-shared key alone means TLS keyed by it ([`Security::psk`]): encryption is the default.
impl From<Psk> for Security {
    fn from(psk: Psk) -> Self {
        Security::psk(psk)
    }
}

/// A stream after its security layer: what the DWCP stream handshake runs over and with which key.
#[derive(Debug)]
pub struct Secured {
    /// The stream: a [`TlsConn`] in the TLS modes, the transport connection itself in plain text.
    pub conn: Box<dyn Conn>,
    /// The key of the DWCP handshake on this stream (see [`Psk::bound_to_channel`]).
    pub handshake_key: Psk,
    /// The negotiated TLS parameters, `None` in plain text.
    pub session: Option<String>,
}

fn credentials(what: impl fmt::Display) -> Error {
    SecurityError::Credentials(what.to_string()).into()
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn tls13_client(
    provider: &Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, Error> {
    ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(credentials)
}

fn tls13_server(
    provider: &Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, Error> {
    ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(credentials)
}

/// Settings both ends share: no session tickets or resumption (every stream is a full handshake
/// with fresh keys), no early data.
fn finish_server(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Arc::new(config)
}

fn finish_client(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    Arc::new(config)
}

impl Security {
    /// TLS 1.3 with mutual X.509 authentication: `ca_pem` is the CA both ends trust, `cert_pem` this
    /// endpoint's certificate chain (leaf first) and `key_pem` its private key. A client checks that
    /// the server's certificate names the address it dialled (or [`with_server_name`](Self::with_server_name));
    /// a server accepts only clients with a certificate of the same CA.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        let mut cas = 0;
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| credentials(format!("the CA file: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| credentials(format!("the CA certificate: {e}")))?;
            cas += 1;
        }
        if cas == 0 {
            return Err(credentials("the CA file holds no certificate"));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| credentials(format!("the certificate file: {e}")))?;
        if chain.is_empty() {
            return Err(credentials("the certificate file holds no certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| credentials(format!("the private key file: {e}")))?;
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(credentials)?;
        let server = tls13_server(&provider)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| credentials(format!("this endpoint's certificate and key: {e}")))?;
        let client = tls13_client(&provider)?
            .with_root_certificates(Arc::clone(&roots))
            .with_client_auth_cert(chain.clone(), key)
            .map_err(|e| credentials(format!("this endpoint's certificate and key: {e}")))?;
        let fingerprint = dwcp_core::hash::xxh3_64(&chain[0]);
        Ok(Self(Arc::new(Inner::Tls {
            mode: SecurityMode::Certificates,
            psk: None,
            client: finish_client(client),
            server: finish_server(server),
            server_name: None,
            fingerprint,
        })))
    }

    /// [`from_pem`](Self::from_pem) from the files `ca.pem`, `node.pem` and `node.key` in `dir`
    /// (what `dwcp certs init` writes for each node).
    pub fn from_cert_dir(dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path)
                .map_err(|e| credentials(format!("reading {}: {e}", path.display())))
        };
        Self::from_pem(
            &read(crate::certs::CA_FILE)?,
            &read(crate::certs::CERT_FILE)?,
            &read(crate::certs::KEY_FILE)?,
        )
    }

    /// TLS 1.3 keyed by a pre-shared key, for sites without a CA. rustls has no external-PSK
    /// handshake, so the server presents a certificate made for this process and the client does
    /// not check it; instead both ends prove the key in the DWCP handshake, keyed by an exporter
    /// value of the TLS session ([`Psk::bound_to_channel`]): a man in the middle holds two
    /// sessions with two values and cannot make either proof. Forward secrecy comes from the TLS
    /// key exchange.
    ///
    /// # Panics
    /// If the process cannot make a key pair (its random number generator failed).
    pub fn psk(psk: Psk) -> Self {
        static SERVER: std::sync::OnceLock<Arc<ServerConfig>> = std::sync::OnceLock::new();
        let provider = provider();
        let server = SERVER
            .get_or_init(|| {
                let (chain, key) = crate::certs::ephemeral_server_certificate()
                    .expect("making the PSK-mode server certificate");
                finish_server(
                    tls13_server(&provider)
                        .expect("TLS 1.3 is supported")
                        .with_no_client_auth()
                        .with_single_cert(chain, key)
                        .expect("a fresh certificate and its key match"),
                )
            })
            .clone();
        let client = tls13_client(&provider)
            .expect("TLS 1.3 is supported")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(Arc::clone(&provider))))
            .with_no_client_auth();
        let fingerprint = psk.fingerprint() ^ 0x7473_6c70_736b;
        Self(Arc::new(Inner::Tls {
            mode: SecurityMode::PreSharedKey,
            psk: Some(psk),
            client: finish_client(client),
            server,
            server_name: None,
            fingerprint,
        }))
    }

    /// No encryption: streams are authenticated by `psk` and carry pages in clear text. For
    /// trusted links and comparisons only; reports and metrics say so.
    pub fn insecure_plaintext(psk: Psk) -> Self {
        Self(Arc::new(Inner::Plaintext(psk)))
    }

    /// In certificate mode, the name the server's certificate must carry instead of the dialled
    /// address (a DNS name or an IP address). No effect in the other modes.
    pub fn with_server_name(self, name: &str) -> Result<Self, Error> {
        let parsed = ServerName::try_from(name.to_string())
            .map_err(|e| Error::Config(format!("server name {name:?}: {e}")))?;
        Ok(match &*self.0 {
            Inner::Tls {
                mode,
                psk,
                client,
                server,
                fingerprint,
                ..
            } => Self(Arc::new(Inner::Tls {
                mode: *mode,
                psk: psk.clone(),
                client: Arc::clone(client),
                server: Arc::clone(server),
                server_name: Some(parsed),
                fingerprint: *fingerprint,
            })),
            Inner::Plaintext(_) => self,
        })
    }

    /// The protection these streams get.
    pub fn mode(&self) -> SecurityMode {
        match &*self.0 {
            Inner::Tls { mode, .. } => *mode,
            Inner::Plaintext(_) => SecurityMode::InsecurePlaintext,
        }
    }

    /// Tells pooled connections secured differently apart, without revealing keys.
    pub fn fingerprint(&self) -> u64 {
        match &*self.0 {
            Inner::Tls { fingerprint, .. } => *fingerprint,
            Inner::Plaintext(psk) => psk.fingerprint(),
        }
    }

    /// The rustls client configuration, for async transports (`tokio-rustls`); `None` in plain text.
    pub fn client_config(&self) -> Option<Arc<ClientConfig>> {
        match &*self.0 {
            Inner::Tls { client, .. } => Some(Arc::clone(client)),
            Inner::Plaintext(_) => None,
        }
    }

    /// The rustls server configuration, for async transports; `None` in plain text.
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        match &*self.0 {
            Inner::Tls { server, .. } => Some(Arc::clone(server)),
            Inner::Plaintext(_) => None,
        }
    }

    /// The server name a client checks when it dials `peer`.
    pub fn server_name_for(&self, peer: SocketAddr) -> ServerName<'static> {
        match &*self.0 {
            Inner::Tls {
                server_name: Some(name),
                ..
            } => name.clone(),
            _ => ServerName::IpAddress(peer.ip().into()),
        }
    }

    /// The DWCP handshake key of a TLS session whose exporter value is `exporter`.
    pub fn handshake_key(&self, exporter: &[u8]) -> Result<Psk, Error> {
        match &*self.0 {
            Inner::Tls { psk: Some(psk), .. } => Ok(psk.bound_to_channel(exporter)),
            Inner::Tls { psk: None, .. } => Psk::from_channel_binding(exporter)
                .ok_or_else(|| Error::Protocol("short TLS exporter value".into())),
            Inner::Plaintext(psk) => Ok(psk.clone()),
        }
    }

    /// The exporter label and length async transports use with [`handshake_key`](Self::handshake_key).
    pub fn exporter_label() -> &'static [u8] {
        EXPORTER_LABEL
    }

    /// Secures a connection this endpoint opened to `peer`, finishing the TLS handshake by `deadline`.
    pub fn connect(
        &self,
        conn: Box<dyn Conn>,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Result<Secured, Error> {
        match &*self.0 {
            Inner::Plaintext(psk) => Ok(Secured {
                conn,
                handshake_key: psk.clone(),
                session: None,
            }),
            Inner::Tls { client, .. } => {
                let tls =
                    rustls::ClientConnection::new(Arc::clone(client), self.server_name_for(peer))
                        .map_err(|e| handshake_error(&peer.to_string(), e))?;
                self.finish(
                    rustls::Connection::Client(tls),
                    conn,
                    peer.to_string(),
                    deadline,
                )
            }
        }
    }

    /// Secures a connection a peer opened to this endpoint, finishing the TLS handshake by `deadline`.
    pub fn accept(&self, conn: Box<dyn Conn>, deadline: Instant) -> Result<Secured, Error> {
        let peer = conn
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "the peer".into());
        match &*self.0 {
            Inner::Plaintext(psk) => Ok(Secured {
                conn,
                handshake_key: psk.clone(),
                session: None,
            }),
            Inner::Tls { server, .. } => {
                let tls = rustls::ServerConnection::new(Arc::clone(server))
                    .map_err(|e| handshake_error(&peer, e))?;
                self.finish(rustls::Connection::Server(tls), conn, peer, deadline)
            }
        }
    }

    fn finish(
        &self,
        mut tls: rustls::Connection,
        mut conn: Box<dyn Conn>,
        peer: String,
        deadline: Instant,
    ) -> Result<Secured, Error> {
        drive_handshake(&mut tls, &mut *conn, &peer, deadline)?;
        let exporter = tls
            .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
            .map_err(|e| handshake_error(&peer, e))?;
        let handshake_key = self.handshake_key(&exporter)?;
        let stream = TlsConn::new(tls, conn, peer);
        let session = Some(stream.session_description().to_string());
        Ok(Secured {
            conn: Box::new(stream),
            handshake_key,
            session,
        })
    }
}

fn handshake_error(peer: &str, e: rustls::Error) -> Error {
    SecurityError::Handshake {
        peer: peer.to_string(),
        reason: e.to_string(),
    }
    .into()
}

/// Runs a TLS handshake to completion over `conn`. Every read is limited by what is left until
/// `deadline`, so a peer that sends one byte at a time cannot hold the handshake open.
fn drive_handshake(
    tls: &mut rustls::Connection,
    conn: &mut dyn Conn,
    peer: &str,
    deadline: Instant,
) -> Result<(), Error> {
    let mut buf = vec![0u8; HANDSHAKE_CHUNK];
    let mut first = true;
    let io = |e: io::Error| Error::io(format!("the TLS handshake with {peer}"), e);
    loop {
        while tls.wants_write() {
            let left = remaining(deadline, peer)?;
            conn.set_write_timeout(Some(left)).map_err(io)?;
            tls.write_tls(&mut WriteAll(conn))
                .map_err(|e| timeout_or(e, peer, io))?;
        }
        if !tls.is_handshaking() {
            return Ok(());
        }
        let left = remaining(deadline, peer)?;
        conn.set_read_timeout(Some(left)).map_err(io)?;
        let n = match conn.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(timeout_or(e, peer, io)),
        };
        if n == 0 {
            return Err(SecurityError::Handshake {
                peer: peer.to_string(),
                reason: "the peer closed the connection during the TLS handshake (it may have refused our certificate)".into(),
            }
            .into());
        }
        if first && speaks_plain_dwcp(&buf[..n]) {
            return Err(SecurityError::ModeMismatch {
                peer: peer.to_string(),
                theirs: "plain-text DWCP",
                ours: "TLS",
            }
            .into());
        }
        first = false;
        let mut input = &buf[..n];
        while !input.is_empty() {
            tls.read_tls(&mut input).map_err(io)?;
            if let Err(e) = tls.process_new_packets() {
                // Tell the peer why (an alert), best effort, then give up.
                let _ = tls.write_tls(&mut WriteAll(conn));
                return Err(handshake_error(peer, e));
            }
        }
    }
}

fn remaining(deadline: Instant, peer: &str) -> Result<Duration, Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout(format!(
            "the TLS handshake with {peer} did not finish in time"
        )));
    }
    Ok(left)
}

fn timeout_or(e: io::Error, peer: &str, io: impl Fn(io::Error) -> Error) -> Error {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        Error::Timeout(format!(
            "the TLS handshake with {peer} did not finish in time"
        ))
    } else {
        io(e)
    }
}

/// Whether the first bytes from a peer are a DWCP frame header (magic "DWCP") rather than TLS.
fn speaks_plain_dwcp(first: &[u8]) -> bool {
    let n = first.len().min(4);
    n > 0 && first[..n] == dwcp_core::frame::MAGIC[..n]
}

/// Whether the first bytes a plain-text endpoint read are a TLS handshake record (content type 22,
/// version 3.x), so a refusal can say the peer uses TLS.
pub fn looks_like_tls(first: &[u8]) -> bool {
    first.len() >= 2 && first[0] == 0x16 && first[1] == 0x03
}

struct WriteAll<'a>(&'a mut dyn Conn);

impl Write for WriteAll<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Read for WriteAll<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// The client's verifier in PSK mode: any certificate is accepted (authentication is the PSK proof
/// bound to the session), but the handshake signature is still checked against it.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
