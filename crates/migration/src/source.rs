//! The source side: pre-copy with dirty logging, auto-converge, stop-and-copy, or the switch to
//! post-copy.

use crate::disks::DiskCopy;
use crate::duplex::{readable, Duplex, Inbox};
use crate::error::MigrationError;
use crate::handover::{hand_over, pause_for_switch, sync};
use crate::host_cpu::{cpu_features, cpu_vendor};
use crate::link::Link;
use crate::options::{MigrateOptions, MigrationProgress, MigrationSummary, Outgoing, PostcopyMode};
use crate::postcopy;
use crate::sender::PageSender;
use crate::throttle::{Throttle, MAX_THROTTLE};
use crate::tls::{self, Credentials};
use crate::wire::{self, Hello, Kind, WireError, PAGE};
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use xcloud_vmm::extension::{Convergence, Phase, PhaseEvent, RoundFacts};
use xcloud_vmm::{VmHandle, VmState};

/// Migrates the VM behind `handle` to the destination at `addr`. On success the source VM is
/// paused for good and the caller ends it with [`VmHandle::end_migrated`] once it has reported
/// the result (the process may exit as soon as the VM ends).
///
/// The work runs on a thread of its own at background priority
/// ([`xcloud_vm_core::host::BACKGROUND_NICE`]), so that reading, encrypting and sending pages
/// never takes a core from the guest's vCPUs while they run.
pub fn migrate(
    handle: &VmHandle,
    outgoing: &Outgoing,
    addr: &str,
    creds: &Credentials,
    options: MigrateOptions,
) -> Result<MigrationSummary, MigrationError> {
    std::thread::scope(|scope| {
        let sender = std::thread::Builder::new()
            .name("migration".into())
            .spawn_scoped(scope, || {
                xcloud_vm_core::host::lower_thread_priority(0);
                migrate_here(handle, outgoing, addr, creds, options)
            })
            .map_err(|e| MigrationError::Wire(WireError::Io(e)))?;
        let result = sender
            .join()
            .unwrap_or_else(|_| Err(MigrationError::Refused("the migration thread failed".into())));
        let phase = if result.is_ok() {
            Phase::Migrated
        } else {
            Phase::MigrationFailed
        };
        let (round, bytes_sent) = result.as_ref().map_or((0, 0), |s| (s.rounds, s.bytes_sent));
        handle.extensions().phase(PhaseEvent {
            phase,
            round,
            pages: 0,
            bytes_sent,
        });
        result
    })
}

fn migrate_here(
    handle: &VmHandle,
    outgoing: &Outgoing,
    addr: &str,
    creds: &Credentials,
    options: MigrateOptions,
) -> Result<MigrationSummary, MigrationError> {
    let started = Instant::now();
    let _claim = outgoing.claim().ok_or(MigrationError::Busy)?;
    if !handle.disks().is_empty() && options.postcopy != PostcopyMode::Off {
        let paths: Vec<String> = handle.disks().iter().map(|d| d.path.display().to_string()).collect();
        return Err(MigrationError::HasDisks(paths.join(", ")));
    }
    // Measured: the source's NX-recovery thread, at the priority of the vCPU that started it,
    // took the destination guest's core for a 4 ms tick around the switch.
    xcloud_vm_core::host::lower_threads_named(xcloud_vm_core::host::KVM_NX_RECOVERY_THREAD);
    handle.wait_for_memory()?;
    let was_running = match handle.state() {
        VmState::Running => true,
        VmState::Paused => false,
        other => return Err(MigrationError::State(other)),
    };
    let machine = handle.machine();
    let (mut stream, link) = open_stream(handle, addr, creds, options.peer_timeout)?;
    if options.postcopy == PostcopyMode::Now {
        return postcopy::switch(
            handle,
            outgoing,
            &mut stream,
            was_running,
            options.compress,
            started,
            options.peer_timeout,
            || Ok(machine.ram().resident_pages()),
            MigrationSummary::default(),
            &link,
        )
        .map(|mut summary| {
            summary.to = addr.to_string();
            summary
        });
    }
    let logging_on = Instant::now();
    machine.set_dirty_logging(true).map_err(|source| MigrationError::Kvm {
        what: "start dirty-page logging",
        source,
    })?;
    tracing::debug!("dirty-page logging on in {:?}", logging_on.elapsed());
    let result = precopy_and_switch(handle, outgoing, &mut stream, options, was_running, started, &link)
        .map_err(|e| refusal_behind(e, &mut stream));
    if !matches!(result, Err(MigrationError::OutcomeUnknown(_))) {
        let _ = machine.set_dirty_logging(false);
    }
    result.map(|mut summary| {
        summary.to = addr.to_string();
        summary
    })
}

/// A destination that refuses closes the connection while the source may still be writing:
/// the source's write then fails (broken pipe, reset) before it has read why. The refusal is
/// usually in the socket already: read it, so that the error says why, not only that the pipe
/// broke. It is read without writing: a plain read of the TLS stream would first try to send
/// what the failed write left behind, and fail the same way.
fn refusal_behind(error: MigrationError, stream: &mut tls::ClientStream) -> MigrationError {
    let broke = matches!(&error, MigrationError::Wire(WireError::Io(e)) if matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    ));
    if !broke {
        return error;
    }
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut inbox = Inbox::new();
    let mut buf = Vec::new();
    loop {
        match inbox.next_frame(stream, &mut buf) {
            Err(WireError::Refused(why)) => return MigrationError::Refused(why),
            Ok(Some(_)) => continue,
            Ok(None) if Instant::now() < deadline => {
                let _ = readable(&[stream.poll_fd()], 50);
            }
            Ok(None) | Err(_) => return error,
        }
    }
}

/// Connects to the peer at `addr`, proves who we are, says what VM comes (HELLO) and waits for
/// its ACCEPT; then sends the code of the VM's tenant modules for the peer to compile while the
/// memory arrives. Shared by migration and replication.
pub(crate) fn open_stream(
    handle: &VmHandle,
    addr: &str,
    creds: &Credentials,
    peer_timeout: Duration,
) -> Result<(tls::ClientStream, Link), MigrationError> {
    let machine = handle.machine();
    let connect_err = |source| MigrationError::Connect {
        addr: addr.to_string(),
        source,
    };
    let target = addr
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| connect_err(std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))?;
    let tcp = TcpStream::connect_timeout(&target, Duration::from_secs(10)).map_err(connect_err)?;
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(peer_timeout)).map_err(connect_err)?;
    tcp.set_write_timeout(Some(peer_timeout)).map_err(connect_err)?;
    // The stream owns the socket for as long as `link` is used.
    let link = Link::new(std::os::fd::AsRawFd::as_raw_fd(&tcp));
    let mut stream = tls::connect(tcp, creds)?;
    let hello = Hello {
        mem_bytes: machine.ram().size(),
        vcpus: machine.vcpu_count() as u32,
        tsc_khz: machine.tsc_khz(),
        cpu_vendor: cpu_vendor(),
        cpu_features: cpu_features(),
    };
    wire::write_frame(&mut stream, Kind::Hello, &hello.encode())?;
    stream.flush().map_err(WireError::from)?;
    let mut buf = Vec::new();
    // The destination answers only after it checked our certificate: no guest state before.
    wire::expect_frame(&mut stream, &mut buf, Kind::Accept, "ACCEPT")?;
    // The tenant modules' code first: the destination compiles it while the memory arrives.
    let modules = handle.extensions().tenant_code();
    if !modules.is_empty() {
        wire::write_frame(&mut stream, Kind::Modules, &wire::encode_modules(&modules))?;
    }
    Ok((stream, link))
}

/// How fast the guest dirties memory, over the latest rounds that span at least 100 ms (single
/// rounds can last microseconds: too short to tell a rate).
#[derive(Default)]
struct DirtyRate {
    samples: std::collections::VecDeque<(f64, f64)>,
}

impl DirtyRate {
    /// Records `bytes` dirtied over `seconds`; returns the rate in bytes per second.
    fn add(&mut self, seconds: f64, bytes: f64) -> f64 {
        self.samples.push_front((seconds, bytes));
        let (mut time, mut dirtied, mut keep) = (0.0, 0.0, 0);
        for &(t, b) in &self.samples {
            time += t;
            dirtied += b;
            keep += 1;
            if time >= 0.1 {
                break;
            }
        }
        self.samples.truncate(keep);
        dirtied / time.max(1e-6)
    }
}

fn precopy_and_switch<S: Duplex>(
    handle: &VmHandle,
    outgoing: &Outgoing,
    stream: &mut S,
    options: MigrateOptions,
    was_running: bool,
    started: Instant,
    link: &Link,
) -> Result<MigrationSummary, MigrationError> {
    // Dirty logging was turned on just before this call.
    let mut last_fetch = Instant::now();
    let mut dirty_rates = DirtyRate::default();
    let machine = handle.machine();
    let mut page = vec![0u8; PAGE];
    // Disks first, while the guest runs; what it writes meanwhile is tracked and sent again.
    let mut disk_copy = DiskCopy::start(handle, stream)?;
    let mut sender = PageSender::new(stream, options.compress);
    let read_page = |pfn: u64, page: &mut [u8]| read_guest_page(machine, pfn, page);
    // Where the migration is, for `ctl status` and for the VM's extensions.
    let progress = |phase: Phase, round: u32, pages_sent: u64, bytes_sent: u64, dirty_pages: u64| {
        outgoing.set_progress(Some(MigrationProgress {
            phase: phase.name().into(),
            round,
            pages_sent,
            bytes_sent,
            dirty_pages,
        }));
        handle.extensions().phase(PhaseEvent {
            phase,
            round,
            pages: dirty_pages,
            bytes_sent,
        });
    };

    // First pass: every page that was ever touched and is not zero.
    let resident = machine.ram().resident_pages();
    progress(Phase::FirstPass, 0, 0, 0, resident.len() as u64);
    let pass_start = Instant::now();
    for &pfn in &resident {
        read_page(pfn, &mut page)?;
        if !xcloud_vm_core::memory::is_zero(&page) {
            sender.page(pfn, &page)?;
        }
    }
    sender.flush()?;
    tracing::debug!(
        "first pass: {} pages, {} MiB in {:?}",
        sender.pages,
        sender.bytes >> 20,
        pass_start.elapsed()
    );
    let delivered = sender.bytes.saturating_sub(link.in_flight()).max(1);
    let mut bandwidth = delivered as f64 / pass_start.elapsed().as_secs_f64().max(1e-6);

    // Rounds of dirtied pages until the VM's convergence policy ends the pre-copy: the
    // provider's built-in (`precopy`), or a tenant's module that replaces its answers.
    let mut rounds = 0;
    let mut sent_last = resident.len() as u64;
    let mut throttle: Option<Throttle> = None;
    let mut max_throttle = 0;
    let (last_pass, to_postcopy) = loop {
        let mut dirty = fetch_dirty_pages(machine)?;
        let remaining_bytes = dirty.len() as f64 * (8 + PAGE) as f64;
        let dirty_rate = dirty_rates.add(last_fetch.elapsed().as_secs_f64(), remaining_bytes);
        last_fetch = Instant::now();
        let throttle_percent = throttle.as_ref().map_or(0, |t| t.percent());
        let facts = RoundFacts {
            round: rounds,
            dirty_pages: dirty.len() as u64,
            sent_last_round: sent_last,
            bandwidth,
            dirty_rate,
            rtt: link.rtt(),
            in_flight: link.in_flight(),
            max_downtime: options.max_downtime,
            max_rounds: options.max_rounds,
            throttle_percent,
            throttle_maxed: throttle_percent >= MAX_THROTTLE,
            postcopy_allowed: was_running && options.postcopy == PostcopyMode::Converge,
            throttle_allowed: was_running,
            compress_option: options.compress,
        };
        let verdict = match handle.extensions().converge(&facts) {
            // The provider's bound on rounds holds whatever a policy answers.
            _ if rounds >= options.max_rounds => Convergence::StopAndCopy,
            Some(verdict) => verdict,
            None => Convergence::StopAndCopy,
        };
        tracing::debug!(
            "round {rounds}: {} dirty pages, {} KiB in flight, link {:.0} MB/s, guest dirties {:.0} MB/s, RTT {:?}: {verdict:?}",
            dirty.len(),
            facts.in_flight >> 10,
            bandwidth / 1e6,
            dirty_rate / 1e6,
            facts.rtt,
        );
        match verdict {
            Convergence::PostCopy => break (dirty, true),
            Convergence::StopAndCopy => break (dirty, false),
            Convergence::Throttle => {
                let t = throttle.get_or_insert_with(|| Throttle::start(handle.clone()));
                t.raise();
                max_throttle = max_throttle.max(t.percent());
            }
            Convergence::NextRound => {}
        }
        sender.set_compress(handle.extensions().compress(&facts));
        rounds += 1;
        progress(Phase::PreCopy, rounds, sender.pages, sender.bytes, dirty.len() as u64);
        // A tenant's policy may order the round's pages (the same pages, in its order).
        handle.extensions().order_pages(&mut dirty);
        let round_start = Instant::now();
        let (bytes_before, in_flight_before) = (sender.bytes, link.in_flight());
        for &pfn in &dirty {
            read_page(pfn, &mut page)?;
            sender.page(pfn, &page)?;
        }
        sender.flush()?;
        sent_last = dirty.len() as u64;
        let elapsed = round_start.elapsed().as_secs_f64();
        // What left this host, not what went into the socket buffers.
        let delivered = (sender.bytes - bytes_before + in_flight_before).saturating_sub(link.in_flight());
        if elapsed > 0.005 && delivered > 0 {
            bandwidth = delivered as f64 / elapsed;
        }
    };

    if to_postcopy {
        // Wait until everything in flight is applied (the guest still runs), then switch: the
        // pages left are those of the last dirty fetch and whatever the guest dirtied since.
        sync(sender.out)?;
        progress(
            Phase::PostCopy,
            rounds,
            sender.pages,
            sender.bytes,
            last_pass.len() as u64,
        );
        let before = MigrationSummary {
            rounds,
            throttle_percent: max_throttle,
            pages_sent: sender.pages,
            zero_pages_sent: sender.zero_pages,
            bytes_sent: sender.bytes,
            ..Default::default()
        };
        let pages_left = || {
            let mut pages = fetch_dirty_pages(machine)?;
            pages.extend_from_slice(&last_pass);
            pages.sort_unstable();
            pages.dedup();
            Ok(pages)
        };
        drop(throttle);
        return postcopy::switch(
            handle,
            outgoing,
            sender.out,
            was_running,
            options.compress,
            started,
            options.peer_timeout,
            pages_left,
            before,
            link,
        );
    }

    // The last pre-copy pass, sent while the guest still runs; then wait until the destination
    // has applied everything in flight, so that the downtime does not include draining the
    // socket buffers.
    for &pfn in &last_pass {
        read_page(pfn, &mut page)?;
        sender.page(pfn, &page)?;
    }
    sender.flush()?;
    sync(sender.out)?;

    // Stop-and-copy: only what the guest dirtied since the last dirty-log fetch.
    drop(throttle);
    let pause_start = Instant::now();
    let fail = pause_for_switch(handle, was_running)?;
    progress(Phase::StopAndCopy, rounds, sender.pages, sender.bytes, 0);
    let pending = fetch_dirty_pages(machine).map_err(fail)?;
    let paused_at = pause_start.elapsed();
    let state = handle
        .save_state()
        .map_err(MigrationError::from)
        .and_then(|s| Ok(s.encode()?))
        .map_err(fail)?;
    let state_at = pause_start.elapsed();
    for &pfn in &pending {
        read_page(pfn, &mut page).map_err(fail)?;
        sender.page(pfn, &page).map_err(|e| fail(e.into()))?;
    }
    sender.flush().map_err(|e| fail(e.into()))?;
    // The disk chunks written since the last round: the device is paused, nothing is in flight.
    disk_copy.send_dirty(sender.out).map_err(fail)?;
    let (pages_sent, zero_pages_sent, page_bytes) = (sender.pages, sender.zero_pages, sender.bytes + disk_copy.bytes);
    let stream = sender.out;
    let sent_at = pause_start.elapsed();
    progress(Phase::Handover, rounds, pages_sent, page_bytes, 0);
    hand_over(stream, &state).map_err(|h| h.into_error(fail))?;
    let downtime = pause_start.elapsed();
    tracing::debug!(
        "stop-and-copy: paused after {paused_at:?}, state saved at {state_at:?}, {} pages sent at {sent_at:?}, running at {downtime:?}",
        pending.len()
    );
    let total = started.elapsed();
    let bytes_sent = page_bytes + 5 + state.len() as u64;
    Ok(MigrationSummary {
        to: String::new(),
        postcopy: false,
        throttle_percent: max_throttle,
        total_ms: total.as_secs_f64() * 1e3,
        downtime_ms: downtime.as_secs_f64() * 1e3,
        rounds,
        pages_sent,
        zero_pages_sent,
        pages_requested: 0,
        bytes_sent,
        bandwidth_mbps: bytes_sent as f64 / total.as_secs_f64() / 1e6,
    })
}

/// Copies guest page `pfn` into `page` (4096 bytes).
///
/// Pages are copied with a plain memcpy while the guest may be writing them (as every VMM
/// does): a torn copy is harmless because the write also marks the page dirty, so it is sent
/// again in a later round or while the guest is paused.
pub(crate) fn read_guest_page(
    machine: &xcloud_vm_core::machine::Machine,
    pfn: u64,
    page: &mut [u8],
) -> Result<(), MigrationError> {
    let pages_in_ram = machine.ram().size() / PAGE as u64;
    if pfn >= pages_in_ram || page.len() != PAGE {
        return Err(MigrationError::Refused(format!(
            "guest page {pfn} is outside guest RAM"
        )));
    }
    let host_base = machine.ram().host_base() as *const u8;
    // SAFETY: pfn < pages_in_ram, so [host_base + pfn * 4096, +4096) lies inside the guest RAM
    // mapping, which the machine keeps alive while it is borrowed here; `page` is a distinct
    // 4096-byte buffer of the caller's, so the ranges do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(host_base.add(pfn as usize * PAGE), page.as_mut_ptr(), PAGE) };
    Ok(())
}

/// The pages written since the last fetch.
pub(crate) fn fetch_dirty_pages(machine: &xcloud_vm_core::machine::Machine) -> Result<Vec<u64>, MigrationError> {
    machine.fetch_dirty_pages().map_err(|source| MigrationError::Kvm {
        what: "read the dirty log",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dirty_rate_spans_at_least_100_ms() {
        let mut rate = DirtyRate::default();
        assert_eq!(rate.add(0.2, 20e6), 100e6);
        // A 1 ms round with 1 MB does not make it 1 GB/s: the 200 ms before still count.
        let r = rate.add(0.001, 1e6);
        assert!((r - 21e6 / 0.201).abs() < 1.0, "{r}");
        // Once 100 ms of newer rounds exist, the old one drops out.
        assert_eq!(rate.add(0.1, 1e6), 1e6 / 0.1);
    }

    #[test]
    fn a_refusal_behind_a_broken_pipe_is_read_without_writing_again() {
        use crate::tls::{Credentials, Identity};
        let dir = std::env::temp_dir().join(format!("xcloud-refusal-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        let source_cert = Identity::generate(&a, "a", true).expect("identity").cert;
        let destination_cert = Identity::generate(&b, "b", true).expect("identity").cert;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("addr");
        let destination = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().expect("accept");
            let creds = Credentials {
                identity: Identity::load(&b).expect("identity"),
                peer: source_cert,
            };
            let mut stream = tls::accept(tcp, &creds).expect("handshake");
            let mut buf = Vec::new();
            wire::read_frame(&mut stream, &mut buf).expect("first frame");
            // Refuses, then closes with the source's frames unread: the source's writes fail.
            crate::destination::refuse(&mut stream, "no disk directory here".into());
        });
        let creds = Credentials {
            identity: Identity::load(&a).expect("identity"),
            peer: destination_cert,
        };
        let mut stream = tls::connect(TcpStream::connect(addr).expect("connect"), &creds).expect("handshake");
        let payload = vec![7u8; 256 << 10];
        let mut failed = None;
        for _ in 0..4096 {
            if let Err(e) = wire::write_frame(&mut stream, Kind::Pages, &payload)
                .and_then(|_| stream.flush().map_err(WireError::from))
            {
                failed = Some(MigrationError::Wire(e));
                break;
            }
        }
        destination.join().expect("destination");
        let error = failed.expect("the writes failed once the destination closed");
        match refusal_behind(error, &mut stream) {
            MigrationError::Refused(why) => assert_eq!(why, "no disk directory here"),
            other => panic!("not the refusal: {other}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
