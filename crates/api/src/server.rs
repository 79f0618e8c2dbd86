//! The server side: one thread accepts, one thread per connection reads request lines and
//! answers them.
//!
//! Every input is bounded: a line longer than [`MAX_LINE`] is discarded as it arrives (never
//! buffered) and answered with an error; a connection may stay idle for [`IDLE_TIMEOUT`] and
//! take [`REQUEST_DEADLINE`] for one line; at most [`MAX_CONNECTIONS`] are served at once (the
//! next one is answered with an error and closed); when accepting fails (out of file
//! descriptors) the listener backs off instead of spinning.

use crate::execute::{execute, execute_standby, failure};
use crate::protocol::{ApiError, Response, MAX_LINE};
use crate::watchdog::Watchdog;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xcloud_migration::Outgoing;
use xcloud_vmm::VmHandle;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a connection may send nothing before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one request line may take to arrive once it has begun.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long an answer may wait for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest pause between two failed accepts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A listening API socket; the socket file is removed when this is dropped.
pub struct ApiServer {
    path: PathBuf,
    outgoing: Outgoing,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // A replication tells its backup that the VM ended here before the process exits, so
        // that the backup lets it go instead of taking over.
        self.outgoing.unprotect();
        // Only our socket: something else put at the path since is not ours to remove.
        if is_socket(&self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl ApiServer {
    /// Fences the VM's protections through `fence` (docs/replication.md).
    pub fn set_fence(&self, fence: Arc<dyn xcloud_migration::Fence>) {
        self.outgoing.set_fence(fence);
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// What is at `path` in words, when it is not a socket.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_fifo() {
        "a FIFO"
    } else {
        "a device"
    }
}

/// Makes `path` free for a new socket: nothing there, or a socket nobody listens on any more
/// (a VMM that is gone), which is removed. Anything else at `path` is left alone.
fn claim_path(path: &Path) -> Result<(), ApiError> {
    let shown = || path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ApiError::Bind { path: shown(), source }),
        Ok(meta) if !meta.file_type().is_socket() => Err(ApiError::NotASocket {
            path: shown(),
            found: kind_of(&meta),
        }),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(ApiError::InUse { path: shown() }),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| ApiError::Bind { path: shown(), source })
            }
            Err(source) => Err(ApiError::Bind { path: shown(), source }),
        },
    }
}

/// Listens on `path` and serves requests for the VM behind `handle` on a background thread;
/// with `watchdog`, its watchdog is armed with that window from the start (crate::watchdog).
pub fn serve(path: &Path, handle: VmHandle, watchdog: Option<Duration>) -> Result<ApiServer, ApiError> {
    let shown = path.display().to_string();
    let outgoing = Outgoing::new();
    let dog = Watchdog::new();
    if let Some(window) = watchdog {
        dog.renew(&handle, &outgoing, window).map_err(|detail| ApiError::Bind {
            path: shown.clone(),
            source: std::io::Error::other(detail),
        })?;
    }
    claim_path(path)?;
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: shown.clone(),
        source,
    })?;
    std::thread::Builder::new()
        .name("api".into())
        .stack_size(256 * 1024)
        .spawn({
            let outgoing = outgoing.clone();
            move || {
                accept_loop(listener, Arc::new(AtomicBool::new(false)), move |stream| {
                    serve_connection(stream, &handle, &outgoing, &dog)
                })
            }
        })
        .map_err(|source| ApiError::Bind { path: shown, source })?;
    Ok(ApiServer {
        path: path.to_path_buf(),
        outgoing,
    })
}

/// The control socket of a VMM standing by as a backup: it answers `status` with what the
/// backup holds. Dropping it stops it and frees the path for the VM's own socket.
pub struct StandbyServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Listens on `path` for a VMM that stands by (docs/replication.md), reporting `watch`.
pub fn serve_standby(path: &Path, watch: xcloud_migration::StandbyWatch) -> Result<StandbyServer, ApiError> {
    let shown = path.display().to_string();
    claim_path(path)?;
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: shown.clone(),
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = std::thread::Builder::new()
        .name("api-standby".into())
        .stack_size(256 * 1024)
        .spawn({
            let stop = stop.clone();
            move || {
                accept_loop(listener, stop, move |stream| {
                    serve_lines(stream, |text| execute_standby(&watch, text), |_| {})
                })
            }
        })
        .map_err(|source| ApiError::Bind { path: shown, source })?;
    Ok(StandbyServer {
        path: path.to_path_buf(),
        stop,
        thread: Some(thread),
    })
}

impl Drop for StandbyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A connection of our own wakes the accept, which then sees `stop` and ends, closing
        // the listener. The path is freed at once either way: the VM's own socket may follow.
        let woke = UnixStream::connect(&self.path).is_ok();
        if is_socket(&self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
        if let (true, Some(thread)) = (woke, self.thread.take()) {
            let _ = thread.join();
        }
    }
}

/// Counts a served connection for as long as it lives.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts connections until `stop` is set (checked after each accept), each served by
/// `serve` on a thread of its own.
fn accept_loop(listener: UnixListener, stop: Arc<AtomicBool>, serve: impl Fn(UnixStream) + Clone + Send + 'static) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                stream
            }
            Err(e) => {
                // Out of descriptors or memory: retrying at once would spin a core and starve
                // the connections being served.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_BACKOFF);
                tracing::warn!("control socket: cannot accept a connection ({e}); retrying in {backoff:?}");
                std::thread::sleep(backoff);
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            let busy = failure(format!(
                "too many connections (at most {MAX_CONNECTIONS}): try again later"
            ));
            let mut stream = stream;
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = answer(&mut stream, &busy);
            continue;
        }
        let slot = Slot(open.clone());
        let serve = serve.clone();
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let _slot = slot;
                serve(stream)
            });
        if let Err(e) = spawned {
            tracing::warn!("control socket: cannot start a connection thread: {e}");
        }
    }
}

fn answer(out: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response).map_err(std::io::Error::other)?;
    text.push('\n');
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Answers the request lines of one connection with `respond`; `then` acts on each answer
/// once it is written.
fn serve_lines(stream: UnixStream, respond: impl Fn(&str) -> Response, then: impl Fn(&Response)) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    if stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err() || out.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let mut lines = LineReader::new(stream, MAX_LINE, REQUEST_DEADLINE);
    loop {
        let response = match lines.next_line() {
            Ok(Line::Request(line)) => match std::str::from_utf8(line) {
                Ok(text) => respond(text.trim()),
                Err(_) => failure("request is not UTF-8".into()),
            },
            Ok(Line::TooLong) => failure(format!("request longer than {MAX_LINE} bytes")),
            Ok(Line::End) | Err(_) => return,
        };
        let written = answer(&mut out, &response);
        then(&response);
        if written.is_err() {
            return;
        }
    }
}

fn serve_connection(stream: UnixStream, handle: &VmHandle, outgoing: &Outgoing, watchdog: &Watchdog) {
    serve_lines(
        stream,
        |text| execute(handle, outgoing, watchdog, text),
        |response| {
            // A migrated VM ends only after its answer went out: ending it lets the process exit.
            if let Some(summary) = &response.migrated {
                handle.end_migrated(&summary.to);
            }
            // Likewise a stop: the process ends with the VM.
            if response.stopping {
                handle.stop();
            }
        },
    )
}

/// What [`LineReader::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A line, without its newline (the last line may lack one).
    Request(&'a [u8]),
    /// A line longer than the limit, discarded up to and including its newline.
    TooLong,
    /// The peer closed the connection.
    End,
}

/// Splits a byte stream into lines of at most `limit` bytes, in memory bounded by the limit:
/// the bytes of a longer line are dropped as they arrive. A line must arrive within `deadline`
/// of its first byte (the peer's reads are also bounded by the stream's own timeout).
pub struct LineReader<R> {
    input: R,
    limit: usize,
    deadline: Duration,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as the previous line.
    consumed: usize,
}

impl<R: Read> LineReader<R> {
    /// Lines of at most `limit` bytes from `input`.
    pub fn new(input: R, limit: usize, deadline: Duration) -> Self {
        Self {
            input,
            limit,
            deadline,
            buf: Vec::with_capacity(8 * 1024),
            consumed: 0,
        }
    }

    fn fill(&mut self, started: &mut Option<Instant>) -> std::io::Result<usize> {
        let begun = *started.get_or_insert_with(Instant::now);
        if begun.elapsed() > self.deadline {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("a request took longer than {:?} to arrive", self.deadline),
            ));
        }
        let mut chunk = [0u8; 8 * 1024];
        let n = self.input.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next line.
    pub fn next_line(&mut self) -> std::io::Result<Line<'_>> {
        self.buf.drain(..self.consumed);
        self.consumed = 0;
        let mut started = (!self.buf.is_empty()).then(Instant::now);
        let mut searched = 0;
        loop {
            if let Some(at) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                let end = searched + at;
                if end > self.limit {
                    self.consumed = end + 1;
                    return Ok(Line::TooLong);
                }
                self.consumed = end + 1;
                return Ok(Line::Request(&self.buf[..end]));
            }
            searched = self.buf.len();
            if self.buf.len() > self.limit {
                // Too long already: drop what came and what comes until the newline.
                loop {
                    self.buf.clear();
                    if self.fill(&mut started)? == 0 {
                        return Ok(Line::End);
                    }
                    if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                        self.consumed = at + 1;
                        return Ok(Line::TooLong);
                    }
                }
            }
            if self.fill(&mut started)? == 0 {
                if self.buf.is_empty() {
                    return Ok(Line::End);
                }
                self.consumed = self.buf.len();
                return Ok(Line::Request(&self.buf[..]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that sends `chunks` one read at a time.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some(mut chunk) = self.0.pop_front() else {
                return Ok(0);
            };
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            if n < chunk.len() {
                self.0.push_front(chunk.split_off(n));
            }
            Ok(n)
        }
    }

    fn lines(chunks: &[&[u8]], limit: usize) -> Vec<Result<String, &'static str>> {
        let input = Chunks(chunks.iter().map(|c| c.to_vec()).collect());
        let mut reader = LineReader::new(input, limit, Duration::from_secs(10));
        let mut out = Vec::new();
        loop {
            match reader.next_line().expect("read") {
                Line::Request(l) => out.push(Ok(String::from_utf8_lossy(l).into_owned())),
                Line::TooLong => out.push(Err("too long")),
                Line::End => return out,
            }
        }
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_served_and_the_next_one_too() {
        let exact = "x".repeat(16);
        let input = format!("{exact}\nnext\n");
        assert_eq!(lines(&[input.as_bytes()], 16), [Ok(exact), Ok("next".into())]);
    }

    #[test]
    fn a_longer_line_is_refused_once_and_the_next_one_served() {
        let long = "y".repeat(17);
        let input = format!("{long}\nnext\n");
        assert_eq!(lines(&[input.as_bytes()], 16), [Err("too long"), Ok("next".into())]);
        // Split across reads, and far longer than any buffer.
        let huge = vec![b'z'; 1 << 20];
        assert_eq!(
            lines(&[b"a\n", &huge, &huge, b"zz\nb", b"\n"], 16),
            [Ok("a".into()), Err("too long"), Ok("b".into())]
        );
    }

    #[test]
    fn memory_stays_bounded_while_a_line_without_end_streams_in() {
        struct Endless(usize);
        impl Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Ok(0);
                }
                self.0 -= 1;
                buf.fill(b'q');
                Ok(buf.len())
            }
        }
        let mut reader = LineReader::new(Endless(100_000), 64 * 1024, Duration::from_secs(60));
        assert_eq!(reader.next_line().expect("read"), Line::End);
        assert!(
            reader.buf.capacity() <= 256 * 1024,
            "{} bytes buffered",
            reader.buf.capacity()
        );
    }

    #[test]
    fn a_line_that_trickles_in_past_its_deadline_ends_the_connection() {
        struct Trickle;
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_millis(5));
                buf[0] = b'{';
                Ok(1)
            }
        }
        let mut reader = LineReader::new(Trickle, 1024, Duration::from_millis(50));
        let err = reader.next_line().expect_err("the deadline passes");
        assert_eq!(err.kind(), ErrorKind::TimedOut);
    }
}
