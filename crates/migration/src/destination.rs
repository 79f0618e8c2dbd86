//! The destination side: checks the stream, builds the VM, applies pages while they arrive,
//! and starts the VM only on the source's GO.

use crate::disks::DiskReceiver;
use crate::duplex::Duplex;
use crate::error::MigrationError;
use crate::host_cpu::{cpu_features, cpu_vendor};
use crate::options::PEER_TIMEOUT;
use crate::postcopy;
use crate::tls::{self, Credentials};
use crate::wire::{self, Hello, Kind, WireError, PAGE};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xcloud_state::StateTree;
use xcloud_vm_core::memory::uffd::Uffd;
use xcloud_vm_core::report::flatten_error;
use xcloud_vmm::{Blank, Console, Vm, VmHandle};

/// A VM received from a source, built and checked but not started.
pub struct Incoming<S: Read + Write> {
    vm: Vm,
    stream: S,
    /// Set in post-copy: the pages still to come, and the userfaultfd that holds them back.
    postcopy: Option<(Uffd, Vec<u64>)>,
    /// The images the disks were copied into: removed unless the VM starts here.
    disks: Option<DiskReceiver>,
}

/// Tuning of the destination side.
#[derive(Clone, Debug, Default)]
pub struct ReceiveOptions {
    /// Where a VM's disks are copied to (a new image per disk, named as at the source); None:
    /// a VM with disks is refused.
    pub disk_dir: Option<std::path::PathBuf>,
}

impl<S: Read + Write> Incoming<S> {
    /// A handle to the received VM (for the control socket and signals).
    pub fn handle(&self) -> VmHandle {
        self.vm.handle()
    }
}

impl<S: Duplex + Send + 'static> Incoming<S> {
    /// Waits for the source's GO, starts the VM and reports RUNNING. Without a GO nothing
    /// runs (the source keeps the VM). In post-copy, the pages then keep arriving on a
    /// background thread while the guest runs, which asks for the pages the guest waits on.
    pub fn start(mut self) -> Result<Vm, MigrationError> {
        let mut buf = Vec::new();
        wire::expect_frame(&mut self.stream, &mut buf, Kind::Go, "GO")?;
        self.vm.start()?;
        if let Some(disks) = self.disks.take() {
            disks.keep();
        }
        wire::write_frame(&mut self.stream, Kind::Running, &[])?;
        self.stream.flush().map_err(WireError::from)?;
        if let Some((uffd, pfns)) = self.postcopy.take() {
            let handle = self.vm.handle();
            let complete = Arc::new(std::sync::atomic::AtomicBool::new(false));
            handle.set_memory_arriving(complete.clone());
            let mut stream = self.stream;
            std::thread::Builder::new()
                .name("postcopy".into())
                .spawn(move || {
                    match postcopy::receive_pages(&mut stream, &uffd, &pfns, handle.mem_bytes()) {
                        Ok(arrivals) => {
                            complete.store(true, std::sync::atomic::Ordering::SeqCst);
                            tracing::info!(
                                "post-copy complete: {} pages, {} asked for by the guest, longest wait {:?}",
                                pfns.len(),
                                arrivals.requested,
                                arrivals.longest_wait
                            )
                        }
                        Err(e) => {
                            // Without its pages the guest cannot go on: stop it, then release
                            // vCPUs blocked on missing pages (below) so that they see the stop.
                            handle.fail(format!("the post-copy stream broke: {}", flatten_error(&e)));
                        }
                    }
                    uffd.unregister();
                })
                .map_err(|e| MigrationError::Wire(WireError::Io(e)))?;
        }
        Ok(self.vm)
    }
}

/// Frees the pages `pfns` (increasing) of the guest RAM file, a run of consecutive pages at a
/// time: reading them afterwards finds them missing.
fn punch_holes(memfd: &std::fs::File, pfns: &[u64]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    for (first, count) in xcloud_vm_core::memory::page_runs(pfns) {
        // SAFETY: fallocate on our own memfd with a range inside it (the page numbers were
        // checked against the RAM size); it touches no memory of ours.
        let rc = unsafe {
            libc::fallocate(
                memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (first * PAGE as u64) as libc::off_t,
                (count * PAGE as u64) as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes the pages of one PAGES frame into guest RAM through its memfd: each run of
/// consecutive pages is one `pwritev`, so the kernel fills them without a fault per page.
pub(crate) fn apply_pages(payload: &[u8], pages: u64, memfd: &std::fs::File) -> Result<u64, WireError> {
    use std::os::fd::AsRawFd;
    static ZERO: [u8; PAGE] = [0u8; PAGE];
    let mut run: Vec<libc::iovec> = Vec::new();
    let mut run_start = 0u64;
    let flush = |run: &mut Vec<libc::iovec>, start: u64| -> Result<(), WireError> {
        let mut done = 0usize;
        let total = run.len() * PAGE;
        while done < total {
            let first = done / PAGE;
            let batch = &run[first..run.len().min(first + 1024)];
            // SAFETY: every iovec points at PAGE bytes of `payload` or of ZERO, both alive for
            // this call; the file offset is inside guest RAM (page numbers were checked against
            // `pages`), and pwritev only reads the buffers.
            let n = unsafe {
                libc::pwritev(
                    memfd.as_raw_fd(),
                    batch.as_ptr(),
                    batch.len() as libc::c_int,
                    ((start + first as u64) * PAGE as u64) as libc::off_t,
                )
            };
            if n <= 0 || n as usize % PAGE != 0 {
                return Err(WireError::Io(std::io::Error::last_os_error()));
            }
            done += n as usize;
        }
        run.clear();
        Ok(())
    };
    let count = wire::for_each_page(payload, pages, |pfn, data| {
        if !run.is_empty() && run_start + run.len() as u64 != pfn {
            flush(&mut run, run_start)?;
        }
        if run.is_empty() {
            run_start = pfn;
        }
        let bytes = data.unwrap_or(&ZERO);
        run.push(libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: PAGE,
        });
        Ok(())
    })?;
    flush(&mut run, run_start)?;
    Ok(count)
}

/// Refuses the stream with `reason` (best effort) and returns the error.
pub(crate) fn refuse<S: Write>(stream: &mut S, reason: String) -> MigrationError {
    let _ = wire::write_frame(stream, Kind::Refuse, reason.as_bytes());
    let _ = stream.flush();
    MigrationError::Refused(reason)
}

/// Reads the peer's HELLO, checks that this host can run its VM (CPU vendor and features, the
/// memory), builds the blank machine for it and answers ACCEPT; anything else is refused.
/// Shared by migration and replication.
pub(crate) fn accept_hello<S: Read + Write>(stream: &mut S) -> Result<(Hello, Blank), MigrationError> {
    let mut buf = Vec::new();
    wire::expect_frame(stream, &mut buf, Kind::Hello, "HELLO")?;
    let hello = match Hello::decode(&buf) {
        Ok(h) => h,
        Err(e) => return Err(refuse(stream, e.to_string())),
    };
    if hello.cpu_vendor != cpu_vendor() {
        let theirs = String::from_utf8_lossy(&hello.cpu_vendor).into_owned();
        let ours = String::from_utf8_lossy(&cpu_vendor()).into_owned();
        return Err(refuse(
            stream,
            format!("the source CPU is {theirs}, this host's is {ours}"),
        ));
    }
    let missing = wire::missing_features(&hello.cpu_features, &cpu_features());
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|(word, bits)| format!("{word} bits {bits:#x}"))
            .collect();
        return Err(refuse(
            stream,
            format!("this host lacks CPU features the guest may use: {}", list.join(", ")),
        ));
    }
    if let Err(e) = xcloud_vm_core::memory::validate_size(hello.mem_bytes, xcloud_vm_core::memory::host_ram_bytes()) {
        return Err(refuse(stream, e.to_string()));
    }
    let blank = match Blank::build(hello.mem_bytes, hello.vcpus as usize).and_then(|mut b| b.prime().map(|_| b)) {
        Ok(b) => b,
        Err(e) => return Err(refuse(stream, flatten_error(&e))),
    };
    wire::write_frame(stream, Kind::Accept, &[])?;
    stream.flush().map_err(WireError::from)?;
    Ok((hello, blank))
}

/// Receives a VM over an authenticated `stream`. On any error nothing runs.
///
/// The receiving runs on a thread of its own at background priority
/// ([`xcloud_vm_core::host::BACKGROUND_NICE`]): when source and destination share a host, the
/// guest still runs at the source meanwhile, and decrypting and writing pages at normal
/// priority took its core for whole scheduler ticks. The VM is started later from the calling
/// thread, so its vCPUs keep the caller's priority.
pub fn receive<S: Read + Write + Send>(
    stream: S,
    console: Console,
    options: &ReceiveOptions,
) -> Result<Incoming<S>, MigrationError> {
    std::thread::scope(|scope| {
        let receiver = std::thread::Builder::new()
            .name("receiver".into())
            .spawn_scoped(scope, move || {
                xcloud_vm_core::host::lower_thread_priority(0);
                receive_here(stream, console, options)
            })
            .map_err(|e| MigrationError::Wire(WireError::Io(e)))?;
        receiver
            .join()
            .unwrap_or_else(|_| Err(MigrationError::Refused("the receiving thread failed".into())))
    })
}

fn receive_here<S: Read + Write>(
    mut stream: S,
    console: Console,
    options: &ReceiveOptions,
) -> Result<Incoming<S>, MigrationError> {
    let mut disks = DiskReceiver::new(options.disk_dir.as_deref());
    let mut buf = Vec::new();
    let (hello, blank) = accept_hello(&mut stream)?;
    let pages = hello.mem_bytes / PAGE as u64;
    let receiving = Instant::now();
    let memfd = blank.ram().file();
    let (ram_base, ram_size) = (blank.ram().host_base(), blank.ram().size());
    let mut postcopy: Option<(Uffd, Vec<u64>)> = None;
    let mut pages_seen = false;
    let mut modules_seen = false;
    let mut unpacked = Vec::new();
    // Two stages: this thread reads and decrypts frames, an applier writes their pages into
    // guest RAM, so that the two overlap. SYNC and STATE wait until the applier has caught up.
    enum ToApplier {
        Pages(Vec<u8>),
        Barrier,
    }
    let received: Result<(Vec<u8>, Instant, Duration), MigrationError> = std::thread::scope(|scope| {
        let (to_applier, inbox) = std::sync::mpsc::sync_channel::<ToApplier>(4);
        let (reply, replies) = std::sync::mpsc::channel::<Result<Duration, WireError>>();
        // Frame buffers go back to the reader once applied: a fresh 4 MiB buffer per frame
        // costs page faults and zeroing on the receiving side.
        let (recycle, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        scope.spawn(move || {
            let mut applying = Duration::ZERO;
            let mut failed = None;
            for message in inbox {
                match message {
                    ToApplier::Pages(frame) if failed.is_none() => {
                        let t = Instant::now();
                        if let Err(e) = apply_pages(&frame, pages, memfd) {
                            failed = Some(e);
                        }
                        applying += t.elapsed();
                        let _ = recycle.send(frame);
                    }
                    ToApplier::Pages(_) => {}
                    ToApplier::Barrier => {
                        let _ = reply.send(failed.take().map_or(Ok(applying), Err));
                    }
                }
            }
        });
        let applier_gone = || WireError::Io(std::io::Error::other("the page applier stopped"));
        let caught_up = || -> Result<Duration, WireError> {
            to_applier.send(ToApplier::Barrier).map_err(|_| applier_gone())?;
            replies.recv().map_err(|_| applier_gone())?
        };
        loop {
            match wire::read_frame(&mut stream, &mut buf)? {
                Kind::Postcopy => {
                    if postcopy.is_some() {
                        return Err(refuse(&mut stream, "a second POSTCOPY".into()));
                    }
                    let pfns = match wire::decode_pfns(&buf, pages) {
                        Ok(p) => p,
                        Err(e) => return Err(refuse(&mut stream, e.to_string())),
                    };
                    // After pre-copy, the pages still to come hold stale copies: drop them, so
                    // that they are missing (and fault) until they arrive, as the pages never
                    // sent are.
                    if pages_seen {
                        let dropped = caught_up().map_err(|e| e.to_string()).and_then(|_| {
                            punch_holes(memfd, &pfns).map_err(|e| format!("cannot drop stale pages: {e}"))
                        });
                        if let Err(why) = dropped {
                            return Err(refuse(&mut stream, why));
                        }
                    }
                    // SAFETY: the blank's RAM stays mapped while its VM lives, which Incoming
                    // keeps beside the registration; no guest has run on it and no Rust
                    // reference points into it (pages go in through the memfd).
                    match unsafe { Uffd::register(ram_base, ram_size) } {
                        Ok(uffd) => postcopy = Some((uffd, pfns)),
                        Err(e) => return Err(refuse(&mut stream, format!("cannot set up post-copy here: {e}"))),
                    }
                }
                kind @ (Kind::Pages | Kind::PagesLz4) => {
                    pages_seen = true;
                    if kind == Kind::PagesLz4 {
                        if let Err(e) = wire::decompress_pages(&buf, &mut unpacked) {
                            return Err(refuse(&mut stream, e.to_string()));
                        }
                        std::mem::swap(&mut buf, &mut unpacked);
                    }
                    if postcopy.is_some() {
                        return Err(refuse(
                            &mut stream,
                            "pages before the switch in a post-copy stream".into(),
                        ));
                    }
                    // The frame's shape and page numbers are checked here, so that a hostile
                    // frame is refused at once; the applier only writes.
                    if let Err(e) = wire::for_each_page(&buf, pages, |_, _| Ok(())) {
                        return Err(refuse(&mut stream, e.to_string()));
                    }
                    let next = spare.try_recv().unwrap_or_default();
                    if to_applier
                        .send(ToApplier::Pages(std::mem::replace(&mut buf, next)))
                        .is_err()
                    {
                        return Err(applier_gone().into());
                    }
                }
                Kind::Modules => {
                    if modules_seen || pages_seen {
                        return Err(refuse(&mut stream, "a MODULES frame after the first frames".into()));
                    }
                    modules_seen = true;
                    match wire::decode_modules(&buf) {
                        Ok(codes) => codes.into_iter().for_each(prepare_in_background),
                        Err(why) => return Err(refuse(&mut stream, why)),
                    }
                }
                Kind::DiskBegin => {
                    if let Err(why) = disks.begin(&buf) {
                        return Err(refuse(&mut stream, why));
                    }
                }
                Kind::DiskData => {
                    if let Err(why) = disks.data(&buf) {
                        return Err(refuse(&mut stream, why));
                    }
                }
                Kind::Sync => {
                    if let Err(e) = caught_up() {
                        return Err(refuse(&mut stream, e.to_string()));
                    }
                    wire::write_frame(&mut stream, Kind::Synced, &[])?;
                    stream.flush().map_err(WireError::from)?;
                }
                Kind::State => {
                    let arrived = Instant::now();
                    return match caught_up() {
                        Ok(applying) => Ok((std::mem::take(&mut buf), arrived, applying)),
                        Err(e) => Err(refuse(&mut stream, e.to_string())),
                    };
                }
                other => return Err(refuse(&mut stream, format!("unexpected {other:?} frame"))),
            }
        }
    });
    let (state, state_arrived, applying) = received?;
    let mut state = match StateTree::decode(&state) {
        Ok(s) => s,
        Err(e) => return Err(refuse(&mut stream, flatten_error(&e))),
    };
    if let Err(why) = disks.finish(&mut state) {
        return Err(refuse(&mut stream, why));
    }
    // The state is checked against the machine built for the HELLO (its shape, every section).
    let vm = match Vm::from_state(blank, state, console) {
        Ok(vm) => vm,
        Err(e) => return Err(refuse(&mut stream, flatten_error(&e))),
    };
    tracing::debug!(
        "destination: {:?} receiving, {applying:?} of it writing pages; state applied {:?} after it arrived",
        state_arrived - receiving,
        state_arrived.elapsed()
    );
    Ok(Incoming {
        vm,
        stream,
        postcopy,
        disks: Some(disks),
    })
}

/// How long a connecting peer has to complete the TLS handshake (prove it is the pinned source).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections are turned away until one ends.
pub const MAX_HANDSHAKES: usize = 16;

/// A handshake in progress: when it must be done, and the socket to cut if it is not.
struct Pending {
    deadline: Instant,
    tcp: std::net::TcpStream,
    done: Arc<std::sync::atomic::AtomicBool>,
}

/// Listens on `addr`, accepts one authenticated source and receives its VM.
///
/// Handshakes run side by side, each on its own thread, and each is cut after
/// [`HANDSHAKE_TIMEOUT`]: no client — silent, slow, or with the wrong certificate — keeps the
/// real source out for longer than that, and at most [`MAX_HANDSHAKES`] wait at once. The
/// first peer that proves to be the pinned source is served; nothing of the guest is read
/// before that.
pub fn listen_and_receive(
    addr: &str,
    creds: &Credentials,
    console: Console,
    options: &ReceiveOptions,
) -> Result<Incoming<tls::ServerStream>, MigrationError> {
    let stream = listen_and_authenticate(addr, creds)?;
    receive(stream, console, options)
}

/// Listens on `addr` until a peer proves to be the pinned source (the handshakes bounded as
/// [`listen_and_receive`] says) and returns its stream.
pub fn listen_and_authenticate(addr: &str, creds: &Credentials) -> Result<tls::ServerStream, MigrationError> {
    use std::sync::atomic::Ordering;
    let listen_err = |source| MigrationError::Listen {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let (done_tx, authenticated) = std::sync::mpsc::channel::<tls::ServerStream>();
    let mut pending: Vec<Pending> = Vec::new();
    let mut backoff = Duration::ZERO;
    loop {
        for p in &pending {
            if !p.done.load(Ordering::SeqCst) && Instant::now() > p.deadline {
                // Unblocks the handshake's read: it fails, and its thread ends.
                let _ = p.tcp.shutdown(std::net::Shutdown::Both);
                p.done.store(true, Ordering::SeqCst);
            }
        }
        pending.retain(|p| !p.done.load(Ordering::SeqCst));
        if let Ok(stream) = authenticated.recv_timeout(Duration::from_millis(10)) {
            return Ok(stream);
        }
        let (tcp, peer) = match listener.accept() {
            Ok(accepted) => {
                backoff = Duration::ZERO;
                accepted
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tracing::warn!("migration listener: cannot accept ({e}); retrying in {backoff:?}");
                std::thread::sleep(backoff);
                continue;
            }
        };
        if pending.len() >= MAX_HANDSHAKES {
            tracing::warn!("turned away a migration connection from {peer}: {MAX_HANDSHAKES} handshakes already wait");
            continue;
        }
        let (Ok(()), Ok(cut)) = (tcp.set_nonblocking(false), tcp.try_clone()) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_read_timeout(Some(PEER_TIMEOUT));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        pending.push(Pending {
            deadline: Instant::now() + HANDSHAKE_TIMEOUT,
            tcp: cut,
            done: done.clone(),
        });
        let (creds, done_tx) = (creds.clone(), done_tx.clone());
        let spawned = std::thread::Builder::new().name("handshake".into()).spawn(move || {
            let result = tls::accept(tcp, &creds);
            // Past its deadline the socket was cut: whatever the handshake says now is late.
            if done.swap(true, Ordering::SeqCst) {
                return;
            }
            match result {
                Ok(stream) => {
                    let _ = done_tx.send(stream);
                }
                // A peer without the right credentials is turned away; the wait goes on.
                Err(e) => tracing::warn!("refused a migration connection from {peer}: {}", flatten_error(&e)),
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a handshake thread: {e}");
        }
    }
}

/// Compiles the code of a tenant module the VM brings, on a thread of its own at background
/// priority, so that loading the module at the switch finds it compiled (a few milliseconds of
/// the guest's downtime each, measured, otherwise).
pub(crate) fn prepare_in_background(code: &[u8]) {
    let code = code.to_vec();
    let _ = std::thread::Builder::new().name("ext-compile".into()).spawn(move || {
        xcloud_vm_core::host::lower_thread_priority(0);
        xcloud_vmm::extension::prepare_module(&code);
    });
}
