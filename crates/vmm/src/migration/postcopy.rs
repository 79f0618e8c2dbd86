//! Post-copy: the destination runs the guest before its memory has arrived.
//!
//! The source pauses, sends the list of pages to come (POSTCOPY), the state and GO; once the
//! destination reports RUNNING it streams every page in order. Guest RAM at the destination is
//! registered with userfaultfd, so a vCPU touching a page that has not arrived waits; the
//! destination then asks for that page (REQUEST) on the same connection and the source sends
//! it ahead of the stream. Both ends use the connection in both directions from one thread:
//! [`Duplex`] tells what has arrived without waiting for more.

use super::wire::{self, Kind, WireError, PAGE};
use super::{hand_over, pause_for_switch, MigrationError, MigrationSummary, PageSender};
use crate::snapshot::lazy::Uffd;
use crate::vm::{self, VmHandle};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Pages per PAGES frame once the guest runs at the destination: small frames, so that a
/// requested page does not queue behind much of the stream.
const FRAME_PAGES: usize = 64;

/// Unsent bytes the kernel may hold during post-copy (TCP_NOTSENT_LOWAT).
const UNSENT_LIMIT: u32 = 256 * 1024;

/// A connection both ends of post-copy read and write from one thread.
pub trait Duplex: Read + Write {
    /// Reads what has already arrived: Ok(n > 0) bytes, Ok(0) the peer closed, an error of
    /// kind WouldBlock when nothing has arrived yet.
    fn read_arrived(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// The descriptor to poll for more input.
    fn poll_fd(&self) -> RawFd;
}

impl<C, D> Duplex for rustls::StreamOwned<C, super::tls::Socket>
where
    C: DerefMut + Deref<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    fn read_arrived(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => return other,
            }
            // Nothing decrypted is waiting: take what the socket holds, if anything.
            if !self.sock.has_buffered() && !readable(&[self.sock.tcp().as_raw_fd()], 0)? {
                return Err(ErrorKind::WouldBlock.into());
            }
            if self.conn.read_tls(&mut self.sock)? == 0 {
                return Ok(0);
            }
            self.conn
                .process_new_packets()
                .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
        }
    }

    fn poll_fd(&self) -> RawFd {
        self.sock.tcp().as_raw_fd()
    }
}

/// Whether any of `fds` (one or two: the connection, the userfaultfd) has input, waiting up to
/// `timeout_ms` (an interrupted wait is "no"). Called for every frame: nothing is allocated.
fn readable(fds: &[RawFd], timeout_ms: i32) -> std::io::Result<bool> {
    let mut polled = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 2];
    let count = fds.len().min(polled.len());
    for (slot, &fd) in polled.iter_mut().zip(fds) {
        slot.fd = fd;
    }
    // SAFETY: polls the first `count` entries of `polled` (descriptors the caller owns); the
    // array lives across the call.
    match unsafe { libc::poll(polled.as_mut_ptr(), count as libc::nfds_t, timeout_ms) } {
        n if n < 0 => {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        n => Ok(n > 0),
    }
}

/// Frames reassembled from whatever has arrived, without waiting for the rest.
struct Inbox {
    bytes: Vec<u8>,
    chunk: Vec<u8>,
}

impl Inbox {
    fn new() -> Self {
        Self {
            bytes: Vec::new(),
            chunk: vec![0u8; 256 * 1024],
        }
    }

    /// The next whole frame (its payload in `out`), or None if it has not all arrived.
    fn next_frame(&mut self, stream: &mut impl Duplex, out: &mut Vec<u8>) -> Result<Option<Kind>, WireError> {
        loop {
            if self.bytes.len() >= 5 {
                let len = u32::from_le_bytes([self.bytes[1], self.bytes[2], self.bytes[3], self.bytes[4]]);
                if len > wire::MAX_FRAME {
                    return Err(WireError::TooLarge(len));
                }
                let end = 5 + len as usize;
                if self.bytes.len() >= end {
                    // read_frame checks the kind and turns REFUSE into an error.
                    let kind = wire::read_frame(&mut &self.bytes[..end], out)?;
                    self.bytes.drain(..end);
                    return Ok(Some(kind));
                }
            }
            match stream.read_arrived(&mut self.chunk) {
                Ok(0) => return Err(WireError::Io(ErrorKind::UnexpectedEof.into())),
                Ok(n) => self.bytes.extend_from_slice(&self.chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next whole frame, waiting up to `timeout` for it.
    fn wait_frame(
        &mut self,
        stream: &mut impl Duplex,
        out: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<Kind, WireError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(kind) = self.next_frame(stream, out)? {
                return Ok(kind);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WireError::Io(ErrorKind::TimedOut.into()));
            }
            readable(&[stream.poll_fd()], left.as_millis().clamp(1, 1000) as i32)?;
        }
    }
}

/// Source: pause, send the list of pages to come (`pages_left`, asked once the guest is
/// paused) and the state, hand over, then stream those pages while the destination runs the
/// guest, sending the pages it asks for first. The downtime does not grow with memory size or
/// dirty rate. `before` is what pre-copy did before the switch (nothing in `Now` mode).
#[allow(clippy::too_many_arguments)]
pub(super) fn switch<S: Duplex>(
    handle: &VmHandle,
    stream: &mut S,
    was_running: bool,
    compress: bool,
    started: Instant,
    peer_timeout: Duration,
    pages_left: impl FnOnce() -> Result<Vec<u64>, MigrationError>,
    before: MigrationSummary,
    link: &super::Link,
) -> Result<MigrationSummary, MigrationError> {
    let shared = &handle.shared;
    let pause_start = Instant::now();
    let fail = pause_for_switch(handle, was_running)?;
    let pfns = pages_left().map_err(fail)?;
    let state = handle
        .collect_state()
        .and_then(|s| Ok(s.encode()?))
        .map_err(|e| fail(e.into()))?;
    let limit = shared.ram.size() / PAGE as u64;
    if pfns.last().is_some_and(|&last| last >= limit) || pfns.windows(2).any(|w| w[0] >= w[1]) {
        return Err(fail(MigrationError::Refused(
            "the pages left are out of range or order".into(),
        )));
    }
    let announced = wire::encode_pfns(&pfns);
    wire::write_frame(stream, Kind::Postcopy, &announced).map_err(|e| fail(e.into()))?;
    hand_over(stream, &state).map_err(|h| h.into_error(fail))?;
    let downtime = pause_start.elapsed();
    // A requested page waits behind what the kernel holds unsent: keep that to a few frames.
    link.limit_unsent(UNSENT_LIMIT);
    let host_base = shared.ram.host_base() as *const u8;
    let page_of = |pfn: u64, page: &mut [u8]| {
        // SAFETY: `pfn` is one of `pfns`, checked above to be below the RAM's page count, so
        // the 4 KiB at host_base + pfn * 4096 lie in the guest RAM mapping that `shared` keeps
        // alive; the guest is paused for good, and `page` is our own distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(host_base.add(pfn as usize * PAGE), page.as_mut_ptr(), PAGE) };
    };
    let mut page = vec![0u8; PAGE];
    let mut sender = PageSender::with_frame_pages(stream, compress, FRAME_PAGES);
    let mut inbox = Inbox::new();
    let mut frame = Vec::new();
    let mut requested = 0u64;
    let streamed = (|| -> Result<(), WireError> {
        let mut sent = vec![false; pfns.len()];
        // Queued for sending out of turn: each page at most once, however often it is asked for.
        let mut queued = vec![false; pfns.len()];
        let mut unsent = pfns.len();
        // Where the stream goes on: after a request, from the page after the requested one
        // (the guest is likely to touch it next), round to the start for what was skipped.
        let mut next = 0;
        let mut urgent = VecDeque::new();
        while unsent > 0 {
            // What the guest waits for goes first.
            while let Some(kind) = inbox.next_frame(sender.out, &mut frame)? {
                if kind != Kind::Request {
                    return Err(WireError::Unexpected {
                        expected: "REQUEST",
                        got: kind,
                    });
                }
                for pfn in wire::decode_request(&frame, limit)? {
                    // A page not announced is a zero page the destination maps itself.
                    if let Ok(i) = pfns.binary_search(&pfn) {
                        if !sent[i] && !queued[i] {
                            queued[i] = true;
                            urgent.push_back(i);
                        }
                    }
                }
            }
            if !urgent.is_empty() {
                sender.flush()?;
                while let Some(i) = urgent.pop_front() {
                    if !sent[i] {
                        sent[i] = true;
                        unsent -= 1;
                        requested += 1;
                        page_of(pfns[i], &mut page);
                        sender.page(pfns[i], &page)?;
                        next = i + 1;
                    }
                }
                sender.flush()?;
                continue;
            }
            shared.set_progress(Some(super::MigrationProgress {
                phase: "post-copy".into(),
                round: before.rounds,
                pages_sent: before.pages_sent + sender.pages,
                bytes_sent: before.bytes_sent + sender.bytes,
                dirty_pages: unsent as u64,
            }));
            // Then one frame of the stream between looks at the inbox.
            while unsent > 0 {
                if next >= pfns.len() {
                    next = 0;
                }
                let i = next;
                next += 1;
                if sent[i] {
                    continue;
                }
                sent[i] = true;
                unsent -= 1;
                page_of(pfns[i], &mut page);
                if sender.page(pfns[i], &page)? {
                    break;
                }
            }
        }
        sender.flush()?;
        wire::write_frame(sender.out, Kind::End, &[])?;
        sender.out.flush()?;
        // Requests already on their way ask for pages that went out since: ignored.
        loop {
            match inbox.wait_frame(sender.out, &mut frame, peer_timeout)? {
                Kind::Complete => return Ok(()),
                Kind::Request => continue,
                other => {
                    return Err(WireError::Unexpected {
                        expected: "COMPLETE",
                        got: other,
                    })
                }
            }
        }
    })();
    if let Err(e) = streamed {
        return Err(MigrationError::OutcomeUnknown(format!(
            "the post-copy stream broke ({}); the destination cannot continue without its pages",
            vm::flatten_error(&e)
        )));
    }
    let total = started.elapsed();
    let bytes_sent = before.bytes_sent + sender.bytes + state.len() as u64 + announced.len() as u64;
    Ok(MigrationSummary {
        to: String::new(),
        total_ms: total.as_secs_f64() * 1e3,
        downtime_ms: downtime.as_secs_f64() * 1e3,
        rounds: before.rounds,
        throttle_percent: before.throttle_percent,
        postcopy: true,
        pages_sent: before.pages_sent + sender.pages,
        zero_pages_sent: before.zero_pages_sent + sender.zero_pages,
        pages_requested: requested,
        bytes_sent,
        bandwidth_mbps: bytes_sent as f64 / total.as_secs_f64() / 1e6,
    })
}

/// What the destination saw of post-copy.
#[derive(Debug, Default)]
pub(super) struct Arrivals {
    /// Pages the guest touched before they came, and asked for.
    pub requested: u64,
    /// The longest a vCPU waited for a page it touched.
    pub longest_wait: Duration,
}

/// Destination: places every page as it arrives (UFFDIO_COPY also wakes a vCPU waiting for it),
/// asks for the pages vCPUs wait on, maps zero pages where nothing will come, and answers
/// COMPLETE after END once every announced page is in place.
pub(super) fn receive_pages<S: Duplex>(
    stream: &mut S,
    uffd: &Uffd,
    pfns: &[u64],
    mem_bytes: u64,
) -> Result<Arrivals, WireError> {
    let limit = mem_bytes / PAGE as u64;
    let mut arrived = vec![false; pfns.len()];
    let mut missing = pfns.len();
    // When each requested page was first asked for.
    let mut waiting: Vec<Option<Instant>> = vec![None; pfns.len()];
    let mut arrivals = Arrivals::default();
    let mut inbox = Inbox::new();
    let (mut frame, mut unpacked, mut ask) = (Vec::new(), Vec::new(), Vec::new());
    let mut heard_from_source = Instant::now();
    loop {
        if heard_from_source.elapsed() > super::PEER_TIMEOUT {
            return Err(WireError::Io(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("nothing from the source for {:?}", super::PEER_TIMEOUT),
            )));
        }
        while let Some(kind) = inbox.next_frame(stream, &mut frame)? {
            heard_from_source = Instant::now();
            match kind {
                Kind::Pages | Kind::PagesLz4 => {
                    if kind == Kind::PagesLz4 {
                        wire::decompress_pages(&frame, &mut unpacked)?;
                        std::mem::swap(&mut frame, &mut unpacked);
                    }
                    wire::for_each_page(&frame, limit, |pfn, data| {
                        let i = pfns.binary_search(&pfn).map_err(|_| WireError::Malformed {
                            kind,
                            detail: format!("page {pfn} was not announced"),
                        })?;
                        match data {
                            Some(d) => uffd.copy(pfn, d),
                            None => uffd.zero(pfn),
                        }
                        .map_err(WireError::Io)?;
                        if !arrived[i] {
                            arrived[i] = true;
                            missing -= 1;
                        }
                        if let Some(asked) = waiting[i].take() {
                            arrivals.longest_wait = arrivals.longest_wait.max(asked.elapsed());
                        }
                        Ok(())
                    })?;
                }
                Kind::End if missing == 0 => {
                    wire::write_frame(stream, Kind::Complete, &[])?;
                    stream.flush()?;
                    return Ok(arrivals);
                }
                Kind::End => {
                    return Err(WireError::Malformed {
                        kind: Kind::End,
                        detail: format!("{missing} of {} pages did not arrive", pfns.len()),
                    })
                }
                other => {
                    return Err(WireError::Unexpected {
                        expected: "PAGES or END",
                        got: other,
                    })
                }
            }
        }
        while let Some(pfn) = uffd.next_fault(0) {
            match pfns.binary_search(&pfn) {
                // Nothing will come for it: it is a zero page.
                Err(_) => uffd.zero(pfn).map_err(WireError::Io)?,
                Ok(i) if !arrived[i] && waiting[i].is_none() => {
                    waiting[i] = Some(Instant::now());
                    arrivals.requested += 1;
                    ask.push(pfn);
                }
                Ok(_) => {}
            }
        }
        if !ask.is_empty() {
            for chunk in ask.chunks(wire::MAX_REQUEST) {
                wire::write_frame(stream, Kind::Request, &wire::encode_request(chunk))?;
            }
            stream.flush()?;
            ask.clear();
        }
        readable(&[stream.poll_fd(), uffd.raw_fd()], 100)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::lazy::ScratchMapping;

    /// A source that has sent `input` and then closed; what the destination writes is kept.
    struct Feed {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Feed {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Feed {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Duplex for Feed {
        fn read_arrived(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
        fn poll_fd(&self) -> RawFd {
            -1
        }
    }

    /// Guest RAM of `pages` pages registered with userfaultfd, as at a post-copy destination.
    struct Ram {
        uffd: Uffd,
        memory: ScratchMapping,
    }

    impl Ram {
        fn new(pages: usize) -> Self {
            let memory = ScratchMapping::new(pages * PAGE).expect("an anonymous mapping");
            let uffd = Uffd::register(memory.base(), memory.len() as u64).expect("userfaultfd (run the tests as root)");
            Self { uffd, memory }
        }

        fn byte(&self, pfn: usize) -> u8 {
            // SAFETY: reads one byte inside our mapping, whose page has been placed (a missing
            // page would block the test, which is what the caller checks it is not).
            unsafe { *(self.memory.base() as *const u8).add(pfn * PAGE) }
        }
    }

    impl Drop for Ram {
        fn drop(&mut self) {
            // Before the mapping goes (fields drop after this).
            self.uffd.unregister();
        }
    }

    fn frames(list: &[(Kind, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, payload) in list {
            wire::write_frame(&mut out, *kind, payload).expect("frame");
        }
        out
    }

    fn pages(list: &[(u64, u8)]) -> Vec<u8> {
        let mut frame = Vec::new();
        for &(pfn, fill) in list {
            wire::push_page(&mut frame, pfn, &[fill; PAGE]);
        }
        frame
    }

    fn run(ram: &Ram, announced: &[u64], input: Vec<u8>) -> (Result<Arrivals, WireError>, Vec<u8>) {
        let mut feed = Feed {
            input: std::io::Cursor::new(input),
            output: Vec::new(),
        };
        let result = receive_pages(&mut feed, &ram.uffd, announced, ram.memory.len() as u64);
        (result, feed.output)
    }

    #[test]
    fn pages_in_any_order_are_placed_and_complete_follows_end() {
        let ram = Ram::new(8);
        let input = frames(&[
            (Kind::Pages, pages(&[(5, 0x55), (1, 0x11)])),
            (Kind::Pages, pages(&[(2, 0), (1, 0x11)])),
            (Kind::End, vec![]),
        ]);
        let (result, output) = run(&ram, &[1, 2, 5], input);
        result.expect("complete");
        assert_eq!(output, frames(&[(Kind::Complete, vec![])]));
        assert_eq!((ram.byte(1), ram.byte(2), ram.byte(5)), (0x11, 0, 0x55));
    }

    #[test]
    fn a_hostile_source_gets_an_error_and_no_complete() {
        let cases: [(&str, Vec<u8>); 5] = [
            ("unannounced page", frames(&[(Kind::Pages, pages(&[(3, 1)]))])),
            ("page beyond RAM", frames(&[(Kind::Pages, pages(&[(8, 1)]))])),
            (
                "END before every page",
                frames(&[(Kind::Pages, pages(&[(1, 1)])), (Kind::End, vec![])]),
            ),
            ("another frame kind", frames(&[(Kind::State, vec![1, 2, 3])])),
            (
                "cut mid-frame",
                frames(&[(Kind::Pages, pages(&[(1, 1)]))])[..100].to_vec(),
            ),
        ];
        for (what, input) in cases {
            let ram = Ram::new(8);
            let (result, output) = run(&ram, &[1, 2], input);
            assert!(result.is_err(), "{what}: accepted");
            assert!(output.is_empty(), "{what}: answered {output:?}");
        }
    }
}
