//! Post-copy: the destination runs the guest before its memory has arrived.
//!
//! The source pauses, sends the list of pages to come (POSTCOPY), the state and GO; once the
//! destination reports RUNNING it streams every page in order. Guest RAM at the destination is
//! registered with userfaultfd, so a vCPU touching a page that has not arrived waits; the
//! destination then asks for that page (REQUEST) on the same connection and the source sends
//! it ahead of the stream. Both ends use the connection in both directions from one thread:
//! [`Duplex`] tells what has arrived without waiting for more.

use crate::duplex::{readable, Duplex, Inbox};
use crate::error::MigrationError;
use crate::handover::{hand_over, pause_for_switch};
use crate::link::Link;
use crate::options::{MigrationProgress, MigrationSummary, Outgoing, PEER_TIMEOUT};
use crate::sender::PageSender;
use crate::wire::{self, Kind, WireError, PAGE};
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::time::{Duration, Instant};
use xcloud_vm_core::memory::uffd::Uffd;
use xcloud_vm_core::report::flatten_error;
use xcloud_vmm::VmHandle;

/// Pages per PAGES frame once the guest runs at the destination: small frames, so that a
/// requested page does not queue behind much of the stream.
const FRAME_PAGES: usize = 64;

/// Unsent bytes the kernel may hold during post-copy (TCP_NOTSENT_LOWAT).
const UNSENT_LIMIT: u32 = 256 * 1024;

/// Source: pause, send the list of pages to come (`pages_left`, asked once the guest is
/// paused) and the state, hand over, then stream those pages while the destination runs the
/// guest, sending the pages it asks for first. The downtime does not grow with memory size or
/// dirty rate. `before` is what pre-copy did before the switch (nothing in `Now` mode).
#[allow(clippy::too_many_arguments)]
pub(crate) fn switch<S: Duplex>(
    handle: &VmHandle,
    outgoing: &Outgoing,
    stream: &mut S,
    was_running: bool,
    compress: bool,
    started: Instant,
    peer_timeout: Duration,
    pages_left: impl FnOnce() -> Result<Vec<u64>, MigrationError>,
    before: MigrationSummary,
    link: &Link,
) -> Result<MigrationSummary, MigrationError> {
    let ram = handle.machine().ram();
    let pause_start = Instant::now();
    let fail = pause_for_switch(handle, was_running)?;
    let pfns = pages_left().map_err(fail)?;
    let state = handle
        .save_state()
        .map_err(MigrationError::from)
        .and_then(|s| Ok(s.encode()?))
        .map_err(fail)?;
    let limit = ram.size() / PAGE as u64;
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
    let host_base = ram.host_base() as *const u8;
    let page_of = |pfn: u64, page: &mut [u8]| {
        // SAFETY: `pfn` is one of `pfns`, checked above to be below the RAM's page count, so
        // the 4 KiB at host_base + pfn * 4096 lie in the guest RAM mapping that `handle` keeps
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
            outgoing.set_progress(Some(MigrationProgress {
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
            flatten_error(&e)
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
pub(crate) struct Arrivals {
    /// Pages the guest touched before they came, and asked for.
    pub requested: u64,
    /// The longest a vCPU waited for a page it touched.
    pub longest_wait: Duration,
}

/// Destination: places every page as it arrives (UFFDIO_COPY also wakes a vCPU waiting for it),
/// asks for the pages vCPUs wait on, maps zero pages where nothing will come, and answers
/// COMPLETE after END once every announced page is in place.
pub(crate) fn receive_pages<S: Duplex>(
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
        if heard_from_source.elapsed() > PEER_TIMEOUT {
            return Err(WireError::Io(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("nothing from the source for {:?}", PEER_TIMEOUT),
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
    use std::io::{Read, Write};
    use std::os::fd::RawFd;
    use xcloud_vm_core::memory::uffd::ScratchMapping;

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
            // SAFETY: the scratch mapping is ours, outlives the registration (Drop unregisters
            // first) and only the test reads it, through raw pointers.
            let uffd = unsafe { Uffd::register(memory.base(), memory.len() as u64) }
                .expect("userfaultfd (run the tests as root)");
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
