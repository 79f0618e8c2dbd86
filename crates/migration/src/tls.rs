//! The migration transport: TLS 1.3 (rustls) with mutual authentication by pinned
//! certificates. Each host has an identity (a self-signed certificate and its key, made by
//! `xcloud keygen`); each side of a migration is given the other's certificate and accepts that
//! certificate and no other. A peer without the right credentials fails the handshake, before
//! any guest state is sent.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme, StreamOwned};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names inside an identity directory.
pub const CERT_FILE: &str = "cert.der";
/// The private key's file name in an identity directory.
pub const KEY_FILE: &str = "key.der";

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "{path} exists: an identity is there already, and peers pinned its certificate (pass --force to replace it)"
    )]
    /// An identity would be overwritten.
    Exists {
        /// The file that is there.
        path: String,
    },
    #[error("cannot read {path}")]
    /// A file cannot be read.
    Read {
        /// The file.
        path: String,
        #[source]
        /// The system's answer.
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    /// A file cannot be written.
    Write {
        /// The file.
        path: String,
        #[source]
        /// The system's answer.
        source: std::io::Error,
    },
    #[error("cannot make a certificate")]
    /// A key pair or certificate cannot be generated.
    Generate(#[source] rcgen::Error),
    #[error("cannot set up TLS")]
    /// The TLS configuration is refused (a broken key or certificate).
    Config(#[source] rustls::Error),
    #[error("TLS handshake with {peer} failed: {reason}")]
    /// The handshake failed: the peer is not the one pinned, or is not there.
    Handshake {
        /// The peer's address.
        peer: String,
        /// What happened, in the user's terms.
        reason: String,
    },
}

/// A host's certificate and private key.
pub struct Identity {
    /// Its self-signed certificate, which peers pin.
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Makes a new self-signed identity named `name` and writes it into `dir`. An identity
    /// already there is kept (every peer pinned its certificate) unless `replace` is set; then
    /// both files are replaced at once. The key is never readable by others, not even while it
    /// is written.
    pub fn generate(dir: &Path, name: &str, replace: bool) -> Result<Self, TlsError> {
        if !replace {
            for file in [CERT_FILE, KEY_FILE] {
                let path = dir.join(file);
                if std::fs::symlink_metadata(&path).is_ok() {
                    return Err(TlsError::Exists {
                        path: path.display().to_string(),
                    });
                }
            }
        }
        let certified = rcgen::generate_simple_self_signed(vec![name.to_string()]).map_err(TlsError::Generate)?;
        let cert = certified.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.display().to_string(),
            source,
        })?;
        write_new(&dir.join(KEY_FILE), key.secret_pkcs8_der(), 0o600)?;
        write_new(&dir.join(CERT_FILE), cert.as_ref(), 0o644)?;
        Ok(Self { cert, key })
    }

    /// Loads the identity in `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            cert: load_cert(&dir.join(CERT_FILE))?,
            key: PrivatePkcs8KeyDer::from(read(&dir.join(KEY_FILE))?),
        })
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Writes `bytes` to `path` through a temporary file created with `mode` (so the bytes are
/// never readable beyond it), synced and renamed over `path`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// The largest certificate or key file read (real ones are a few hundred bytes).
const MAX_CREDENTIAL_FILE: u64 = 64 * 1024;

/// Reads a key or certificate file: a regular file of at most [`MAX_CREDENTIAL_FILE`] bytes (a
/// FIFO or a device would be read without end).
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    xcloud_state::format::read_file(path, "credential file", MAX_CREDENTIAL_FILE).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        source: std::io::Error::other(xcloud_vm_core::report::flatten_error(&e)),
    })
}

/// Loads a certificate (DER) to pin.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    Ok(CertificateDer::from(read(path)?))
}

/// Credentials for one side of a migration.
#[derive(Clone)]
pub struct Credentials {
    /// This host's key and certificate.
    pub identity: Identity,
    /// The one peer certificate accepted.
    pub peer: CertificateDer<'static>,
}

impl Credentials {
    /// Loads this host's identity from `identity_dir` and the peer's certificate from `peer`.
    pub fn load(identity_dir: &Path, peer: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            identity: Identity::load(identity_dir)?,
            peer: load_cert(peer)?,
        })
    }
}

/// Where to find credentials, as given on a command line or in an API request.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CredentialPaths {
    /// This host's identity directory.
    pub identity: PathBuf,
    /// The peer's pinned certificate.
    pub peer_cert: PathBuf,
}

/// Accepts exactly one certificate, on either side of the handshake.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if presented.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// ring's TLS 1.3 suites, AES-128-GCM first: it costs fewer AES rounds per byte of guest
/// memory than AES-256-GCM (10 instead of 14) at a security level TLS 1.3 mandates.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A TLS stream over TCP, either side.
pub type ClientStream = StreamOwned<rustls::ClientConnection, Socket>;
/// The destination's end of a migration connection.
pub type ServerStream = StreamOwned<rustls::ServerConnection, Socket>;

/// The TCP socket under TLS, read in large chunks: rustls asks for one record (16 KiB) or less
/// per read, which at a gigabyte per second is a system call every few microseconds.
pub struct Socket {
    tcp: TcpStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Socket {
    const CHUNK: usize = 256 * 1024;

    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            buf: vec![0u8; Self::CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether bytes read from the socket are waiting here (polling the socket would miss them).
    pub fn has_buffered(&self) -> bool {
        self.start < self.end
    }
}

impl Read for Socket {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.start == self.end {
            if out.len() >= self.buf.len() {
                return self.tcp.read(out);
            }
            self.end = self.tcp.read(&mut self.buf)?;
            self.start = 0;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl Write for Socket {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(data)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.tcp.write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// A TLS 1.3 server configuration presenting `identity` to any client (for xcloudd's API,
/// whose clients authenticate by API key inside the connection).
pub fn server_config(identity: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key())
        .map_err(TlsError::Config)
}

/// A TLS 1.3 client configuration that accepts the server certificate `pinned` and no
/// other, and presents none of its own.
pub fn pinned_client_config(pinned: CertificateDer<'static>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    Ok(rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { cert: pinned, provider }))
        .with_no_client_auth())
}

/// Opens the source side: connects TLS over `tcp` and completes the handshake.
pub fn connect(tcp: TcpStream, creds: &Credentials) -> Result<ClientStream, TlsError> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            cert: creds.peer.clone(),
            provider,
        }))
        .with_client_auth_cert(vec![creds.identity.cert.clone()], creds.identity.key())
        .map_err(TlsError::Config)?;
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    // The name is not checked (the certificate is pinned), but TLS needs one.
    let name = ServerName::try_from("xcloud-peer")
        .map_err(|_| TlsError::Config(rustls::Error::General("server name".into())))?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(TlsError::Config)?;
    let mut stream = StreamOwned::new(conn, Socket::new(tcp));
    handshake(&mut stream.conn, &mut stream.sock).map_err(|e| handshake_failed(peer, &e, &stream.sock))?;
    Ok(stream)
}

/// Opens the destination side over an accepted `tcp` and completes the handshake.
pub fn accept(tcp: TcpStream, creds: &Credentials) -> Result<ServerStream, TlsError> {
    let provider = provider();
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(Pinned {
            cert: creds.peer.clone(),
            provider,
        }))
        .with_single_cert(vec![creds.identity.cert.clone()], creds.identity.key())
        .map_err(TlsError::Config)?;
    // One connection per migration: no resumption, so no session tickets left unread.
    let mut config = config;
    config.send_tls13_tickets = 0;
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let conn = rustls::ServerConnection::new(Arc::new(config)).map_err(TlsError::Config)?;
    let mut stream = StreamOwned::new(conn, Socket::new(tcp));
    handshake(&mut stream.conn, &mut stream.sock).map_err(|e| handshake_failed(peer, &e, &stream.sock))?;
    Ok(stream)
}

/// A failed handshake in the user's terms: the peer was silent, closed the connection, or
/// refused or presented a certificate. The TLS library's own text (which points at its docs)
/// goes to the debug log only.
fn handshake_failed(peer: String, e: &std::io::Error, sock: &Socket) -> TlsError {
    use std::io::ErrorKind;
    tracing::debug!("TLS handshake with {peer}: {e:?}");
    let timeout = sock.tcp().read_timeout().ok().flatten();
    let reason = match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => match timeout {
            Some(t) => format!("the peer sent nothing for {} s", t.as_secs_f64()),
            None => "the peer did not answer in time".into(),
        },
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted => {
            "the peer closed the connection (it may not accept this host's certificate)".into()
        }
        _ => match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(_)) => {
                "the peer's certificate is not the one pinned for it (--peer)".into()
            }
            Some(rustls::Error::NoCertificatesPresented) => "the peer presented no certificate".into(),
            Some(rustls::Error::AlertReceived(alert)) => {
                format!("the peer refused this host ({alert:?}): it does not accept this host's certificate")
            }
            Some(_) => "the peer does not speak xcloud's TLS (a protocol error)".into(),
            None => e.to_string(),
        },
    };
    TlsError::Handshake { peer, reason }
}

fn handshake<C, S>(conn: &mut C, sock: &mut Socket) -> std::io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    while conn.is_handshaking() {
        conn.complete_io(sock)?;
    }
    // The client's last flight (its certificate) is sent by complete_io; flush anything left.
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use xcloud_vm_core::report::flatten_error;

    fn creds(dir: &Path) -> Credentials {
        let me = Identity::generate(&dir.join("me"), "me", true).expect("identity");
        let peer = Identity::generate(&dir.join("peer"), "peer", true).expect("identity");
        Credentials {
            identity: me,
            peer: peer.cert,
        }
    }

    #[test]
    fn credentials_that_are_not_small_regular_files_are_refused_at_once() {
        let err = flatten_error(&load_cert(Path::new("/dev/zero")).expect_err("a device"));
        assert!(err.contains("is a device, not a regular file"), "{err}");
        let dir = std::env::temp_dir().join(format!("xcloud-tls-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let big = dir.join("cert.der");
        std::fs::write(&big, vec![0u8; 1 << 20]).expect("write");
        let err = flatten_error(&load_cert(&big).expect_err("too large"));
        assert!(err.contains("more than the 65536 bytes"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_silent_or_departing_peer_is_reported_in_plain_words() {
        let dir = std::env::temp_dir().join(format!("xcloud-tls-test-{}", std::process::id()));
        let creds = creds(&dir);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("addr");
        // Accepts and says nothing.
        let silent = std::thread::spawn(move || {
            let held = listener.accept();
            std::thread::sleep(std::time::Duration::from_millis(1500));
            drop(held);
            let (closing, _) = listener.accept().expect("accept");
            drop(closing);
        });
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .expect("timeout");
        let err = flatten_error(&connect(tcp, &creds).err().expect("no answer"));
        assert!(err.contains("the peer sent nothing for 1 s"), "{err}");
        let tcp = TcpStream::connect(addr).expect("connect");
        let err = flatten_error(&connect(tcp, &creds).err().expect("closed"));
        assert!(err.contains("the peer closed the connection"), "{err}");
        assert!(!err.contains("docs.rs") && !err.contains("os error"), "{err}");
        silent.join().expect("peer thread");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
