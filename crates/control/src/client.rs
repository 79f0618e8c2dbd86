//! A client of the API, over xcloudd's Unix socket or over TCP with TLS (the server's
//! certificate pinned): blocking for the `xcloud` CLI, async for one host calling another.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use std::path::PathBuf;

/// How long a connection to another host may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a call did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach xcloudd at {endpoint} (is xcloudd running? --url or XCLOUD_URL names its socket or https://HOST:PORT; `xcloud config show` says which was used)")]
    Connect {
        /// The socket.
        endpoint: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("xcloudd at {endpoint}: {detail}")]
    Http {
        /// The socket.
        endpoint: String,
        /// What failed.
        detail: String,
    },
}

/// An answer: its status and body.
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The error message of an error answer (its `error` field, or the body).
    pub fn error_text(&self) -> String {
        serde_json::from_slice::<crate::error::ErrorBody>(&self.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// Where a daemon answers.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// Its Unix socket.
    Unix(PathBuf),
    /// `HOST:PORT` over TLS, accepting only the certificate in the file named.
    Tls {
        /// The address.
        addr: String,
        /// The server's certificate (DER), pinned.
        server_cert: PathBuf,
    },
    /// Another host of a cluster: `HOST:PORT` over TLS, its certificate (DER) from its record.
    Peer {
        /// The address.
        addr: String,
        /// Its certificate, pinned.
        cert: Vec<u8>,
    },
}

impl Endpoint {
    /// Where another host of a cluster answers, as its record says.
    pub fn of_host(host: &crate::model::HostRecord) -> Result<Self, crate::ControlError> {
        let cert = crate::auth::unhex(&host.cert).ok_or_else(|| {
            crate::ControlError::Cluster(format!("host {}'s record has no readable certificate", host.name))
        })?;
        Ok(Self::Peer {
            addr: host.api.clone(),
            cert,
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "{}", p.display()),
            Self::Tls { addr, .. } | Self::Peer { addr, .. } => write!(f, "https://{addr}"),
        }
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A client of one daemon.
pub struct Client {
    endpoint: Endpoint,
    key: Option<String>,
}

impl Client {
    /// A client of the daemon at Unix socket `endpoint`, calling with API key `key`.
    pub fn new(endpoint: PathBuf, key: Option<String>) -> Self {
        Self::at(Endpoint::Unix(endpoint), key)
    }

    /// A client of the daemon at `endpoint`, calling with API key `key`.
    pub fn at(endpoint: Endpoint, key: Option<String>) -> Self {
        Self { endpoint, key }
    }

    fn http(&self, detail: impl std::fmt::Display) -> ClientError {
        ClientError::Http {
            endpoint: self.endpoint.to_string(),
            detail: detail.to_string(),
        }
    }

    fn unreachable(&self, source: std::io::Error) -> ClientError {
        ClientError::Connect {
            endpoint: self.endpoint.to_string(),
            source,
        }
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                Ok(Box::new(s))
            }
            Endpoint::Tls { addr, server_cert } => {
                let pinned = xcloud_migration::tls::load_cert(server_cert).map_err(|e| self.http(e))?;
                self.connect_tls(addr, pinned, &server_cert.display().to_string()).await
            }
            Endpoint::Peer { addr, cert } => {
                let pinned = rustls::pki_types::CertificateDer::from(cert.clone());
                self.connect_tls(addr, pinned, "the host's record").await
            }
        }
    }

    async fn connect_tls(
        &self,
        addr: &str,
        pinned: rustls::pki_types::CertificateDer<'static>,
        whence: &str,
    ) -> Result<Box<dyn Io>, ClientError> {
        let config = xcloud_migration::tls::pinned_client_config(pinned).map_err(|e| self.http(e))?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| self.unreachable(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
            .map_err(|e| self.unreachable(e))?;
        // The certificate is pinned, so the name is not checked; TLS needs one.
        let name = rustls::pki_types::ServerName::try_from("xcloudd").map_err(|e| self.http(e))?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                self.http(format!(
                    "TLS handshake failed ({e}): is {whence} the server's certificate?"
                ))
            })?;
        Ok(Box::new(tls))
    }

    /// Calls `method path` with extra `headers` and an optional body and its content type,
    /// on the caller's runtime; `on_chunk` sees the answer's body as it arrives and returns
    /// false to stop reading. The status and the answer's content type.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(Vec<u8>, &str)>,
        mut on_chunk: impl FnMut(&[u8]) -> bool,
    ) -> Result<(u16, Option<String>), ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| self.http(e))?;
        tokio::spawn(conn);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "xcloudd");
        if let Some(key) = &self.key {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let (bytes, content_type) = body.unwrap_or((Vec::new(), "application/json"));
        let request = request
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| self.http(e))?;
        let mut response = sender.send_request(request).await.map_err(|e| self.http(e))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        while let Some(frame) = response.body_mut().frame().await {
            let frame = frame.map_err(|e| self.http(e))?;
            if let Ok(data) = frame.into_data() {
                if !on_chunk(&data) {
                    break;
                }
            }
        }
        Ok((status, content_type))
    }

    /// Calls `method path` with an optional body and its content type; `on_chunk` sees the
    /// answer's body as it arrives and returns false to stop reading.
    pub fn call_streaming(
        &self,
        method: &str,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
        mut on_chunk: impl FnMut(&[u8]) -> bool,
    ) -> Result<u16, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.http(e))?;
        runtime
            .block_on(self.send(method, path, &[], body, &mut on_chunk))
            .map(|(status, _)| status)
    }

    /// Calls `method path` and returns the whole answer.
    pub fn call(&self, method: &str, path: &str, body: Option<(Vec<u8>, &str)>) -> Result<Answer, ClientError> {
        let mut all = Vec::new();
        let status = self.call_streaming(method, path, body, |chunk| {
            all.extend_from_slice(chunk);
            true
        })?;
        Ok(Answer { status, body: all })
    }
}
