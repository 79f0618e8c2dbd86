//! Virtio disks: what a guest writes reaches the image byte for byte and survives a reboot and
//! a snapshot taken in the middle of the writes; bad disk configurations are refused before
//! the guest starts.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use xcloud_vmm::{CaptureBuffer, Console, DiskSpec, Vm, VmConfig, VmExit};

fn image(name: &str, len: u64) -> PathBuf {
    let path = std::env::temp_dir().join(format!("xcloud-test-{}-{name}.img", std::process::id()));
    let f = std::fs::File::create(&path).expect("create the image");
    f.set_len(len).expect("size the image");
    path
}

fn boot(guest: &str, cmdline: &str, disk: &Path) -> (Vm, CaptureBuffer) {
    let capture = CaptureBuffer::default();
    let config = VmConfig {
        mem_bytes: 64 << 20,
        vcpus: 1,
        cmdline: cmdline.into(),
        disks: vec![DiskSpec {
            path: disk.to_path_buf(),
            read_only: false,
        }],
        nets: Vec::new(),
    };
    let image = xcloud::guests::builtin(guest).expect("built-in guest");
    let mut vm = Vm::new(&config, image, Console::new(Box::new(capture.clone()))).expect("VM");
    vm.start().expect("start");
    (vm, capture)
}

fn run_to_end(guest: &str, cmdline: &str, disk: &Path) -> (VmExit, String) {
    let (vm, capture) = boot(guest, cmdline, disk);
    let exit = vm.wait();
    (exit, capture.text())
}

#[test]
fn what_a_guest_writes_is_in_the_image_and_a_second_boot_reads_it_back() {
    const BYTES: u64 = 8 << 20;
    let path = image("reboot", 16 << 20);
    let (exit, text) = run_to_end("diskwrite", &format!("{BYTES} 42"), &path);
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}: {text}");
    assert!(text.contains("MB/s"), "{text}");
    assert_image_holds(&path, 42, BYTES);
    let (exit, text) = run_to_end("diskread", &format!("{BYTES} 42"), &path);
    assert!(
        matches!(exit, VmExit::Exited(0)) && text.contains("verified"),
        "{exit:?}: {text}"
    );
    let (exit, text) = run_to_end("diskread", &format!("{BYTES} 43"), &path);
    assert!(
        matches!(exit, VmExit::Exited(1)) && text.contains("does not hold"),
        "the wrong seed is noticed: {exit:?}: {text}"
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_snapshot_in_the_middle_of_the_writes_restores_and_the_image_ends_complete() {
    const BYTES: u64 = 96 << 20;
    let path = image("snapshot", 128 << 20);
    let dir = std::env::temp_dir().join(format!("xcloud-test-{}-disk-snapshot", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (vm, capture) = boot("diskwrite", &format!("{BYTES} 9 8"), &path);
    let handle = vm.handle();
    // Let the writes begin, then freeze the VM: the image is left as it was at the snapshot.
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(30));
    handle.pause().expect("pause");
    xcloud_snapshot::save(&handle, &dir).expect("snapshot");
    handle.stop();
    drop(handle);
    let exit = vm.wait();
    assert!(
        !capture.text().contains("diskwrite:"),
        "the snapshot was taken before the writes ended ({:?} in): {exit:?} {}",
        start.elapsed(),
        capture.text()
    );
    let restored_console = CaptureBuffer::default();
    let mut restored =
        xcloud_snapshot::restore(&dir, Console::new(Box::new(restored_console.clone()))).expect("restore");
    restored.start().expect("start the restored VM");
    let exit = restored.wait();
    let text = restored_console.text();
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}: {text}");
    assert_image_holds(&path, 9, BYTES);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(path);
}

#[test]
fn bad_disks_are_refused_before_the_guest_starts() {
    let out = run(&["run", "--disk", "/nonexistent/disk.img", "hello"]);
    assert!(
        !out.status.success() && stderr(&out).contains("does not exist"),
        "{}",
        stderr(&out)
    );
    let small = image("small", 100);
    let out = run(&["run", "--disk", small.to_str().expect("utf-8"), "hello"]);
    assert!(
        stderr(&out).contains("at least one 512-byte sector"),
        "{}",
        stderr(&out)
    );
    let out = run(&["run", "--disk", "x.img,cache=none", "hello"]);
    assert!(stderr(&out).contains("unknown disk option"), "{}", stderr(&out));
    let dir = std::env::temp_dir();
    let out = run(&["run", "--disk", dir.to_str().expect("utf-8"), "hello"]);
    assert!(stderr(&out).contains("not a regular file"), "{}", stderr(&out));
    // A disk another VMM holds.
    let held = image("held", 1 << 20);
    let (vm, _capture) = boot("heartbeat", "", &held);
    let out = run(&["run", "--disk", held.to_str().expect("utf-8"), "hello"]);
    assert!(stderr(&out).contains("is in use"), "{}", stderr(&out));
    assert!(!stdout(&out).contains("Hello"), "the guest never ran: {}", stdout(&out));
    vm.handle().stop();
    vm.wait();
    // A read-only disk: the guest's write fails, the image is untouched.
    let ro = format!("{},ro", held.display());
    let out = run(&["run", "--disk", &ro, "diskwrite", "--", "4096", "5"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("ReadOnly"), "{}", stdout(&out));
    assert!(std::fs::read(&held).expect("read").iter().all(|&b| b == 0));
    for p in [small, held] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn a_vm_with_a_disk_refuses_to_migrate_by_post_copy_and_keeps_running() {
    let path = image("migrate", 1 << 20);
    let keys = std::env::temp_dir().join(format!("xcloud-test-{}-disk-keys", std::process::id()));
    let _ = std::fs::remove_dir_all(&keys);
    xcloud_migration::tls::Identity::generate(&keys, "source", true).expect("identity");
    let creds = xcloud_migration::tls::Credentials::load(&keys, &keys.join("cert.der")).expect("credentials");
    let (vm, capture) = boot("heartbeat", "", &path);
    let handle = vm.handle();
    let err = xcloud_migration::migrate(
        &handle,
        &xcloud_migration::Outgoing::new(),
        "127.0.0.1:9",
        &creds,
        xcloud_migration::MigrateOptions {
            postcopy: xcloud_migration::PostcopyMode::Now,
            ..Default::default()
        },
    )
    .expect_err("a VM with a disk moves by pre-copy only");
    assert!(err.to_string().contains("by post-copy"), "{err}");
    assert_eq!(handle.state(), xcloud_vmm::VmState::Running);
    let seen = capture.text().matches("heartbeat n=").count();
    let deadline = Instant::now() + Duration::from_secs(5);
    while capture.text().matches("heartbeat n=").count() <= seen {
        assert!(Instant::now() < deadline, "the guest goes on: {}", capture.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    handle.stop();
    vm.wait();
    let _ = std::fs::remove_dir_all(&keys);
    let _ = std::fs::remove_file(path);
}
