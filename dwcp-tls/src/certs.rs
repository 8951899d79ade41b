//! Certificates for certificate mode: a CA of one's own and a certificate per node (what
//! `dwcp certs init` writes), and the throw-away server certificate of PSK mode.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use dwcp_core::error::{Error, SecurityError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The CA certificate every node trusts.
pub const CA_FILE: &str = "ca.pem";
/// The CA's private key (keep it off the nodes; it is only needed to issue certificates).
pub const CA_KEY_FILE: &str = "ca.key";
/// A node's certificate.
pub const CERT_FILE: &str = "node.pem";
/// A node's private key.
pub const KEY_FILE: &str = "node.key";

/// Common name of the CAs made here; [`CertificateAuthority::from_pem`] expects it.
const CA_NAME: &str = "DWCP migration CA";
/// How long issued certificates are valid by default.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    SecurityError::Credentials(format!("{what}: {e}")).into()
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A certificate authority that issues node certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertificateAuthority")
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl CertificateAuthority {
    /// A new CA (ECDSA P-256, valid ten years).
    pub fn generate() -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(|e| failed("generating the CA key", e))?;
        let mut params = ca_params();
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + 10 * DEFAULT_VALIDITY).into();
        let cert = params
            .self_signed(&key)
            .map_err(|e| failed("signing the CA", e))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// A CA made by [`generate`](Self::generate), from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| failed("the CA key", e))?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key,
        })
    }

    /// The CA certificate (what every node trusts).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A node certificate for `names` (DNS names or IP addresses, which become the subject
    /// alternative names a client checks), usable as server and as client, valid from
    /// `not_before` to `not_after`.
    pub fn issue_with_validity(
        &self,
        names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCertificate, Error> {
        if names.is_empty() {
            return Err(Error::Config(
                "a node certificate needs at least one name".into(),
            ));
        }
        let key = KeyPair::generate().map_err(|e| failed("generating a node key", e))?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| failed("the certificate names", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0].clone());
        params.distinguished_name = dn;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| failed("signing a node certificate", e))?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate naming `names` and returns the [`Security`](crate::Security) of the
    /// endpoint holding it: in-process clusters and tests, where no files are wanted (for files,
    /// [`issue_into`]).
    pub fn security_for(&self, names: &[&str]) -> Result<crate::Security, Error> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let issued = self.issue(&names)?;
        crate::Security::from_pem(
            self.cert_pem().as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
    }

    /// [`issue_with_validity`](Self::issue_with_validity) from an hour ago for [`DEFAULT_VALIDITY`].
    pub fn issue(&self, names: &[String]) -> Result<IssuedCertificate, Error> {
        let now = SystemTime::now();
        self.issue_with_validity(
            names,
            now - Duration::from_secs(3600),
            now + DEFAULT_VALIDITY,
        )
    }
}

/// Writes a CA (`dir/ca.pem`, `dir/ca.key`) and, per node, `dir/<node>/{ca.pem,node.pem,node.key}`
/// with the node's names as subject alternative names. Private keys are readable by their owner
/// only. Refuses to overwrite an existing CA. Returns each node's directory.
pub fn init_dir(dir: &Path, nodes: &[(String, Vec<String>)]) -> Result<Vec<PathBuf>, Error> {
    if dir.join(CA_FILE).exists() {
        return Err(Error::Config(format!(
            "{} already holds a CA; use another directory or `dwcp certs issue`",
            dir.display()
        )));
    }
    let ca = CertificateAuthority::generate()?;
    write(&dir.join(CA_FILE), ca.cert_pem().as_bytes(), false)?;
    write(&dir.join(CA_KEY_FILE), ca.key_pem().as_bytes(), true)?;
    nodes
        .iter()
        .map(|(node, names)| issue_into(&ca, &dir.join(node), names))
        .collect()
}

/// Issues a node certificate with `ca` into `node_dir` (`ca.pem`, `node.pem`, `node.key`).
pub fn issue_into(
    ca: &CertificateAuthority,
    node_dir: &Path,
    names: &[String],
) -> Result<PathBuf, Error> {
    let issued = ca.issue(names)?;
    write(&node_dir.join(CA_FILE), ca.cert_pem().as_bytes(), false)?;
    write(&node_dir.join(CERT_FILE), issued.cert_pem.as_bytes(), false)?;
    write(&node_dir.join(KEY_FILE), issued.key_pem.as_bytes(), true)?;
    Ok(node_dir.to_path_buf())
}

fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let ctx = |e| Error::io(format!("writing {}", path.display()), e);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(ctx)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(ctx)
}

/// A self-signed server certificate for this process (PSK mode: clients do not check it).
pub(crate) fn ephemeral_server_certificate()
-> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let key = KeyPair::generate().map_err(|e| failed("generating a server key", e))?;
    let params = CertificateParams::new(vec!["dwcp-psk".to_string()])
        .map_err(|e| failed("the server certificate", e))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| failed("signing the server certificate", e))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((vec![cert.der().clone()], key))
}
