//! The control socket, snapshots and restore: real guests are snapshotted while they run and
//! continue from the snapshot in a new process; broken snapshots are refused.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use xcloud_snapshot::memory_file::MemoryFileRecord;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("snapshots").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Starts `xcloud ARGS` with its stdout read line by line on a thread.
/// Starts `xcloud ARGS` with its stdout read line by line.
fn spawn(args: &[&str]) -> (Proc, std::sync::mpsc::Receiver<String>) {
    let mut cmd = xcloud();
    cmd.args(args);
    spawn_lines(cmd)
}

fn beat_count(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("n="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"))
}

fn wait_exit(child: &mut std::process::Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        assert!(Instant::now() < deadline, "xcloud did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_control_socket_pauses_resumes_and_stops_a_vm() {
    let dir = scratch("api");
    let socket = dir.join("vm.sock");
    let (mut child, rx) = spawn(&[
        "run",
        "--vcpus",
        "2",
        "--api",
        socket.to_str().expect("utf-8"),
        "heartbeat",
    ]);
    next_line(&rx, "heartbeat n=");
    assert_eq!(
        ctl(&socket, &["status"]),
        (true, "state: running, 2 vCPUs, 64 MiB\n".into())
    );
    assert_eq!(ctl(&socket, &["pause"]).1, "state: paused\n");
    let (ok, text) = ctl(&socket, &["pause"]);
    assert!(!ok && text.contains("cannot pause a VM that is Paused"), "{text}");
    assert_eq!(ctl(&socket, &["resume"]).1, "state: running\n");

    // Hostile lines get error answers and the connection stays usable.
    let mut conn = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let mut answers = BufReader::new(conn.try_clone().expect("clone"));
    for (request, needle) in [
        ("this is not json\n".to_string(), "malformed request"),
        (
            "{\"api\":99,\"op\":\"status\"}\n".to_string(),
            "API version 99 is not supported",
        ),
        ("{\"api\":1,\"op\":\"format_disk\"}\n".to_string(), "malformed request"),
        (format!("{}\n", "x".repeat(100_000)), "longer than"),
        ("{\"api\":1,\"op\":\"status\"}\n".to_string(), "\"ok\":true"),
    ] {
        conn.write_all(request.as_bytes()).expect("send");
        let mut answer = String::new();
        answers.read_line(&mut answer).expect("answer");
        assert!(answer.contains(needle), "{answer} lacks {needle}");
    }

    assert_eq!(ctl(&socket, &["stop"]).1, "state: running\n");
    assert_eq!(wait_exit(&mut child), Some(130));
    assert!(!socket.exists(), "the socket is removed when the VMM ends");
    let (ok, text) = ctl(&socket, &["status"]);
    assert!(!ok && text.contains("cannot reach the VMM"), "{text}");
}

#[test]
fn a_running_heartbeat_continues_from_its_snapshot_in_a_new_process() {
    let dir = scratch("heartbeat");
    let socket = dir.join("vm.sock");
    let snap = dir.join("snap");
    let (mut child, rx) = spawn(&[
        "run",
        "--vcpus",
        "2",
        "--api",
        socket.to_str().expect("utf-8"),
        "heartbeat",
        "--",
        "0",
        "16",
        "64",
    ]);
    next_line(&rx, "heartbeat n=");
    let (ok, text) = ctl(&socket, &["snapshot", snap.to_str().expect("utf-8")]);
    assert!(ok && text.starts_with("state: running, snapshot: "), "{text}");
    let after_snapshot = beat_count(&next_line(&rx, "heartbeat n="));
    ctl(&socket, &["stop"]);
    wait_exit(&mut child);

    let (mut restored, rx) = spawn(&[
        "restore",
        snap.to_str().expect("utf-8"),
        "--api",
        socket.to_str().expect("utf-8"),
    ]);
    let first = beat_count(&next_line(&rx, "heartbeat n="));
    let second = beat_count(&next_line(&rx, "heartbeat n="));
    assert!(
        first > 0 && first < after_snapshot,
        "restored count {first} continues from the snapshot, before {after_snapshot}"
    );
    assert!(second > first, "the count never goes backwards: {first} then {second}");
    wait_socket(&socket);
    ctl(&socket, &["stop"]);
    assert_eq!(wait_exit(&mut restored), Some(130));
}

#[test]
fn a_guest_restored_mid_run_finishes_its_work_and_exits_normally() {
    let dir = scratch("dirty");
    let socket = dir.join("vm.sock");
    let snap = dir.join("snap");
    let (mut child, rx) = spawn(&[
        "run",
        "--api",
        socket.to_str().expect("utf-8"),
        "dirty",
        "--",
        "8",
        "16",
        "2",
    ]);
    next_line(&rx, "dirty: working set");
    assert_eq!(ctl(&socket, &["pause"]).1, "state: paused\n");
    let (ok, text) = ctl(&socket, &["snapshot", snap.to_str().expect("utf-8")]);
    assert!(
        ok && text.starts_with("state: paused, snapshot: "),
        "a paused VM stays paused: {text}"
    );
    ctl(&socket, &["stop"]);
    wait_exit(&mut child);

    let out = run(&["restore", snap.to_str().expect("utf-8")]);
    assert!(stdout(&out).contains("dirty: done"), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Runs `xcloud run --api SOCKET RUN_ARGS...` in `dir`, waits for its first line starting
/// with `first_line`, snapshots it into `dir/snap`, stops it and returns the snapshot.
fn snapshot_of(dir: &Path, run_args: &[&str], first_line: &str) -> PathBuf {
    let socket = dir.join("vm.sock");
    let snap = dir.join("snap");
    let mut args = vec!["run", "--api", socket.to_str().expect("utf-8")];
    args.extend_from_slice(run_args);
    let (mut child, rx) = spawn(&args);
    next_line(&rx, first_line);
    assert!(ctl(&socket, &["snapshot", snap.to_str().expect("utf-8")]).0);
    ctl(&socket, &["stop"]);
    wait_exit(&mut child);
    snap
}

fn snapshot_of_heartbeat(name: &str) -> PathBuf {
    // A 16 MiB working set written at 64 MiB/s: a lap every 250 ms, each page checked by the
    // guest, so a restore that loses a page stops it.
    snapshot_of(&scratch(name), &["heartbeat", "--", "0", "16", "64"], "heartbeat n=")
}

fn refused(snap: &Path, needle: &str) {
    let out = run(&["restore", snap.to_str().expect("utf-8")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "expected '{needle}': {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(stdout(&out).is_empty(), "nothing ran: {}", stdout(&out));
}

#[test]
fn corrupted_truncated_and_foreign_snapshots_are_refused() {
    let snap = snapshot_of_heartbeat("broken");
    let state = snap.join("vm.state");
    let memory = snap.join("memory.pages");
    let good_state = std::fs::read(&state).expect("state");
    let good_memory = std::fs::read(&memory).expect("memory");

    let mut bad = good_state.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x01;
    std::fs::write(&state, &bad).expect("write");
    refused(&snap, "vm.state is corrupted");

    std::fs::write(&state, &good_state[..good_state.len() - 7]).expect("write");
    refused(&snap, "vm.state is truncated");

    std::fs::write(&state, b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0").expect("write");
    refused(&snap, "not an xcloud vm.state file");

    std::fs::write(&state, &good_state).expect("write");
    std::fs::write(&memory, &good_memory[..good_memory.len() - 4096]).expect("write");
    refused(&snap, "memory.pages is truncated");

    let mut bad = good_memory.clone();
    let last = bad.len() - 100;
    bad[last] ^= 0x80;
    std::fs::write(&memory, &bad).expect("write");
    refused(&snap, "memory.pages is corrupted");

    std::fs::remove_file(&memory).expect("remove");
    refused(&snap, "cannot read or write memory.pages");
    refused(Path::new("/nonexistent/snapshot"), "cannot read or write vm.state");

    std::fs::write(&memory, &good_memory).expect("write");
    let (mut child, rx) = spawn(&["restore", snap.to_str().expect("utf-8")]);
    next_line(&rx, "heartbeat n=");
    child.kill().expect("kill");
    let _ = child.wait();
}

#[test]
fn a_lazy_restore_runs_the_guest_and_loads_its_memory_on_demand() {
    let snap = snapshot_of_heartbeat("lazy");
    let (mut child, rx) = spawn(&["restore", "--lazy", snap.to_str().expect("utf-8")]);
    let first = beat_count(&next_line(&rx, "heartbeat n="));
    let second = beat_count(&next_line(&rx, "heartbeat n="));
    assert!(
        first > 0 && second > first,
        "the restored heartbeat counts on: {first} then {second}"
    );
    child.kill().expect("kill");
    let _ = child.wait();
}

#[test]
fn a_lazy_restore_whose_pages_are_corrupted_is_stopped() {
    let snap = snapshot_of_heartbeat("lazy-corrupt");
    let memory = snap.join("memory.pages");
    let mut bytes = std::fs::read(&memory).expect("memory");
    let last_page = bytes.len() - 4 - 100;
    bytes[last_page] ^= 0x40;
    std::fs::write(&memory, &bytes).expect("write");
    let out = run(&["restore", "--lazy", snap.to_str().expect("utf-8")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(126), "{err}");
    assert!(err.contains("memory.pages is corrupted"), "{err}");
}

#[test]
fn a_guest_whose_memory_changed_behind_its_back_says_so() {
    // The working set of `dirty` checks every page it rewrites against what it wrote one lap
    // before: change one page in a snapshot (and fix the checksum, so the restore accepts it)
    // and the restored guest must notice, not compute on.
    let snap = snapshot_of(&scratch("tampered"), &["dirty", "--", "4", "64"], "dirty: ");
    let memory = snap.join("memory.pages");
    let mut bytes = std::fs::read(&memory).expect("memory");
    let count = u64::from_le_bytes(bytes[24..32].try_into().expect("count")) as usize;
    let data = 32 + count * 8;
    // The working set's 1024 pages: a counter in the first word, zeros after it. A few other
    // pages look alike (the allocator's free-block header), so take the median counter.
    let mut candidates: Vec<(u64, usize)> = (0..count)
        .map(|i| (i, &bytes[data + i * 4096..data + (i + 1) * 4096]))
        .filter(|(_, p)| p[8..].iter().all(|&b| b == 0))
        .map(|(i, p)| (u64::from_le_bytes(p[..8].try_into().expect("word")), i))
        .collect();
    assert!(candidates.len() >= 1024, "{} working-set-like pages", candidates.len());
    candidates.sort_unstable();
    let page = candidates[candidates.len() / 2].1;
    bytes[data + page * 4096] ^= 1;
    let len = bytes.len();
    let crc = crc32fast::hash(&bytes[32..len - 4]);
    bytes[len - 4..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&memory, &bytes).expect("write");
    // vm.state records the memory file it was written with: record the tampered one.
    let state_file = snap.join("vm.state");
    let mut state = xcloud_state::StateTree::decode(&std::fs::read(&state_file).expect("state")).expect("decode");
    let mut record: MemoryFileRecord = state.require(0).expect("the memory file's record");
    record.crc = crc;
    state.save(0, &record).expect("save");
    std::fs::write(&state_file, state.encode().expect("encode")).expect("write");

    let out = run(&["restore", snap.to_str().expect("utf-8")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(101), "{err}");
    assert!(err.contains("guest memory corrupted"), "{err}");
}

#[test]
fn a_snapshot_taken_while_a_lazy_restore_still_loads_has_all_the_memory() {
    // A lazily restored guest runs while its memory still streams in; a snapshot taken at
    // once must still hold every page (the working set checks them all within a lap).
    let dir = scratch("lazy-then-snapshot");
    let first = snapshot_of(
        &dir,
        &["--mem", "1G", "dirty", "--", "512", "512"],
        "dirty: working set",
    );

    let lazy_socket = dir.join("lazy.sock");
    let second = dir.join("second");
    let (mut lazy, _) = spawn(&[
        "restore",
        "--lazy",
        "--api",
        lazy_socket.to_str().expect("utf-8"),
        first.to_str().expect("utf-8"),
    ]);
    wait_socket(&lazy_socket);
    let (ok, text) = ctl(&lazy_socket, &["snapshot", second.to_str().expect("utf-8")]);
    assert!(ok, "{text}");
    ctl(&lazy_socket, &["stop"]);
    wait_exit(&mut lazy);

    // 512 MiB written at 512 MiB/s: a lap a second; two laps must pass without a complaint.
    let (mut restored, out) = spawn(&["restore", second.to_str().expect("utf-8")]);
    assert_keeps_running(&mut restored, &out, Duration::from_millis(2500), "MiB written");
}

#[test]
fn a_snapshot_written_by_format_1_still_restores() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshot-v1-heartbeat");
    // Every section decodes with today's components: the machine, 2 vCPUs, 3 irqchips, COM1.
    let state = std::fs::read(fixture.join("vm.state")).expect("fixture");
    assert_eq!(state[8..12], 1u32.to_le_bytes(), "the fixture is format 1");
    assert_eq!(xcloud_vmm::fuzzing::decode_state(&state).expect("decodes"), 7);
    if xcloud_migration::cpu_vendor() != *b"AuthenticAMD" {
        eprintln!("not an AMD host: the fixture's AMD MSRs cannot be restored here, only decoded");
        return;
    }
    let (mut child, rx) = spawn(&["restore", fixture.to_str().expect("utf-8")]);
    let first = beat_count(&next_line(&rx, "heartbeat n="));
    let second = beat_count(&next_line(&rx, "heartbeat n="));
    assert!(
        first > 96_924_283 && second > first,
        "the heartbeat counts on from its snapshot: {first} then {second}"
    );
    child.kill().expect("kill");
    let _ = child.wait();
}

#[test]
fn the_memory_of_another_snapshot_is_refused() {
    let first = snapshot_of_heartbeat("swap-a");
    let second = snapshot_of(&scratch("swap-b"), &["heartbeat", "--", "0", "8", "64"], "heartbeat n=");
    std::fs::copy(second.join("memory.pages"), first.join("memory.pages")).expect("swap");
    refused(&first, "the memory.pages of another snapshot");
    let out = run(&["restore", "--lazy", first.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("another snapshot"), "{}", stderr(&out));
    // Of the same size, told apart by the checksum.
    let third = snapshot_of(
        &scratch("swap-c"),
        &["heartbeat", "--", "0", "16", "64"],
        "heartbeat n=",
    );
    let len = std::fs::metadata(third.join("memory.pages")).expect("memory").len();
    let mut bytes = std::fs::read(snapshot_of_heartbeat("swap-d").join("memory.pages")).expect("d");
    bytes.resize(len as usize, 0);
    std::fs::write(third.join("memory.pages"), &bytes).expect("same size, other pages");
    refused(&third, "does not belong to this vm.state");
}

/// A heartbeat VMM with `env` set, serving its control socket in `dir`.
fn vmm_with_env(dir: &Path, env: &[(&str, &str)]) -> (Proc, PathBuf) {
    let socket = dir.join("vm.sock");
    let mut cmd = xcloud();
    cmd.args(["run", "--api", socket.to_str().expect("utf-8"), "heartbeat"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (child, rx) = spawn_lines(cmd);
    next_line(&rx, "heartbeat n=");
    (child, socket)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_crash_between_the_snapshot_writes_leaves_the_older_snapshot_whole() {
    let dir = scratch("crash");
    let snap = snapshot_of(&dir, &["heartbeat"], "heartbeat n=");
    let older = (
        std::fs::read(snap.join("vm.state")).expect("state"),
        std::fs::read(snap.join("memory.pages")).expect("memory"),
    );
    // The VMM dies after writing both files of the new snapshot, before they replace the old.
    let (mut crashing, socket) = vmm_with_env(&dir, &[("XCLOUD_FAILPOINT", "snapshot-before-rename")]);
    let (ok, _) = ctl(&socket, &["snapshot", snap.to_str().expect("utf-8")]);
    assert!(!ok, "the VMM was to die in the snapshot");
    wait_exit(&mut crashing);
    assert_eq!(std::fs::read(snap.join("vm.state")).expect("state"), older.0);
    assert_eq!(std::fs::read(snap.join("memory.pages")).expect("memory"), older.1);
    let (mut restored, rx) = spawn(&["restore", snap.to_str().expect("utf-8")]);
    next_line(&rx, "heartbeat n=");
    restored.kill().expect("kill");
    let _ = restored.wait();
    // The next snapshot replaces the old one whole and clears what the crash left.
    let (mut vmm, socket) = vmm_with_env(&dir, &[]);
    assert!(ctl(&socket, &["snapshot", snap.to_str().expect("utf-8")]).0);
    ctl(&socket, &["stop"]);
    wait_exit(&mut vmm);
    assert_ne!(std::fs::read(snap.join("vm.state")).expect("state"), older.0);
    assert_eq!(files_in(&dir), ["snap"].map(String::from).to_vec());
    assert_eq!(files_in(&snap), ["memory.pages", "vm.state"].map(String::from).to_vec());
}

#[test]
fn a_failed_snapshot_leaves_nothing_behind_and_a_directory_of_other_files_is_refused() {
    let dir = scratch("fail");
    let (mut vmm, socket) = vmm_with_env(&dir, &[("XCLOUD_FAILPOINT", "snapshot-write-fails")]);
    let snap = dir.join("snap");
    let (ok, text) = ctl(&socket, &["snapshot", snap.to_str().expect("utf-8")]);
    assert!(!ok && text.contains("failpoint"), "{text}");
    assert_eq!(files_in(&dir), ["vm.sock"].map(String::from).to_vec(), "no leftovers");
    let (ok, _) = ctl(&socket, &["status"]);
    assert!(ok, "the VM runs on after a failed snapshot");
    ctl(&socket, &["stop"]);
    wait_exit(&mut vmm);

    let mine = dir.join("mine");
    std::fs::create_dir_all(&mine).expect("dir");
    std::fs::write(mine.join("notes.txt"), "keep").expect("write");
    let (mut vmm, socket) = vmm_with_env(&dir, &[]);
    let (ok, text) = ctl(&socket, &["snapshot", mine.to_str().expect("utf-8")]);
    assert!(!ok && text.contains("holds notes.txt"), "{text}");
    ctl(&socket, &["stop"]);
    wait_exit(&mut vmm);
    assert_eq!(files_in(&mine), ["notes.txt"].map(String::from).to_vec());
}

#[test]
fn a_fifo_or_a_directory_where_a_snapshot_file_belongs_is_refused_at_once() {
    let snap = snapshot_of_heartbeat("fifo");
    for file in ["vm.state", "memory.pages"] {
        let path = snap.join(file);
        let saved = std::fs::read(&path).expect("file");
        std::fs::remove_file(&path).expect("remove");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let t = Instant::now();
        refused(&snap, "is a FIFO, not a regular file");
        assert!(t.elapsed() < Duration::from_secs(5), "a FIFO blocked the restore");
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("mkdir");
        refused(&snap, "is a directory, not a regular file");
        std::fs::remove_dir(&path).expect("rmdir");
        std::fs::write(&path, saved).expect("restore the file");
    }
}
