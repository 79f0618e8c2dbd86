//! The client side: one request, one answer.

use crate::protocol::{ApiError, Command, Request, Response, API_VERSION, MAX_LINE};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Sends one command to the VMM at `path` and returns its answer.
pub fn call(path: &Path, command: Command) -> Result<Response, ApiError> {
    let shown = path.display().to_string();
    let mut stream = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: shown.clone(),
        source,
    })?;
    let request = Request {
        api: API_VERSION,
        command,
    };
    let mut text = serde_json::to_string(&request).map_err(|e| ApiError::BadAnswer {
        path: shown.clone(),
        detail: e.to_string(),
    })?;
    text.push('\n');
    // A VMM that turns the connection away answers before it reads and closes: its answer is
    // still there to read when the write fails.
    let written = stream.write_all(text.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new((&stream).take(MAX_LINE as u64)).read_line(&mut answer);
    match (written, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(source), _) | (Ok(()), Err(source)) => return Err(ApiError::NoAnswer { path: shown, source }),
        (Ok(()), Ok(_)) => {
            return Err(ApiError::NoAnswer {
                path: shown,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })
        }
    }
    serde_json::from_str(&answer).map_err(|e| ApiError::BadAnswer {
        path: shown,
        detail: e.to_string(),
    })
}
