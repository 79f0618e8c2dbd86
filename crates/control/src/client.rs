//! A blocking client of the API over xcloudd's Unix socket, for the `xcloud` CLI.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use std::path::PathBuf;

/// Why a call did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach xcloudd at {endpoint} (is xcloudd running? --endpoint or XCLOUD_ENDPOINT names its socket)")]
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

/// A client of one daemon.
pub struct Client {
    endpoint: PathBuf,
    key: Option<String>,
}

impl Client {
    /// A client of the daemon at Unix socket `endpoint`, calling with API key `key`.
    pub fn new(endpoint: PathBuf, key: Option<String>) -> Self {
        Self { endpoint, key }
    }

    fn http(&self, detail: impl std::fmt::Display) -> ClientError {
        ClientError::Http {
            endpoint: self.endpoint.display().to_string(),
            detail: detail.to_string(),
        }
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
        runtime.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.endpoint)
                .await
                .map_err(|source| ClientError::Connect {
                    endpoint: self.endpoint.display().to_string(),
                    source,
                })?;
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
            let (bytes, content_type) = body.unwrap_or((Vec::new(), "application/json"));
            let request = request
                .header(hyper::header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(bytes)))
                .map_err(|e| self.http(e))?;
            let mut response = sender.send_request(request).await.map_err(|e| self.http(e))?;
            let status = response.status().as_u16();
            while let Some(frame) = response.body_mut().frame().await {
                let frame = frame.map_err(|e| self.http(e))?;
                if let Ok(data) = frame.into_data() {
                    if !on_chunk(&data) {
                        break;
                    }
                }
            }
            Ok(status)
        })
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
