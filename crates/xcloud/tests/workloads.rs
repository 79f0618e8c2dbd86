//! Every built-in workload boots in a real KVM guest and does its job.

mod common;
use common::*;

#[test]
fn hello_greets_and_exits_zero() {
    let out = run(&["run", "hello"]);
    let text = stdout(&out);
    assert!(
        text.starts_with("Hello from xcloud guest (vcpu 0 of 1, 63 MiB RAM)\n"),
        "{text}"
    );
    assert!(text.contains("all 1 vcpus said hello"), "{text}");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

fn greets_from_every_vcpu(n: usize) {
    let vcpus = n.to_string();
    let out = run(&["run", "--vcpus", &vcpus, "hello"]);
    let text = stdout(&out);
    for i in 1..n {
        assert!(
            text.contains(&format!("Hello from vcpu {i} of {n}\n")),
            "vcpu {i} missing: {text}"
        );
    }
    assert!(text.contains(&format!("all {n} vcpus said hello")), "{text}");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn hello_runs_on_two_vcpus() {
    greets_from_every_vcpu(2);
}

#[test]
fn hello_runs_on_four_vcpus() {
    greets_from_every_vcpu(4);
}

#[test]
fn guest_arguments_and_exit_status_reach_the_host() {
    let out = run(&["run", "hello", "--", "exit", "42"]);
    assert!(stdout(&out).contains(r#"args: ["exit", "42"]"#), "{}", stdout(&out));
    assert_eq!(out.status.code(), Some(42));
}

#[test]
fn a_guest_panic_is_reported_and_fails_the_run() {
    let out = run(&["run", "hello", "--", "panic"]);
    assert_eq!(out.status.code(), Some(101));
    let err = stderr(&out);
    assert!(
        err.contains("guest panicked: panicked at") && err.contains("asked to panic"),
        "{err}"
    );
}

#[test]
fn heartbeat_reports_every_half_second_and_stops_when_asked() {
    let out = run(&["run", "heartbeat", "--", "2"]);
    let text = stdout(&out);
    let beats: Vec<&str> = text.lines().filter(|l| l.starts_with("heartbeat n=")).collect();
    assert!((3..=5).contains(&beats.len()), "{text}");
    let counts: Vec<u64> = beats
        .iter()
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|w| w.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .expect("n=COUNT")
        })
        .collect();
    assert!(counts.windows(2).all(|w| w[0] < w[1]), "counts increase: {counts:?}");
    assert!(text.ends_with("heartbeat: done\n"), "{text}");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn dirty_writes_its_working_set_at_the_asked_rate() {
    let out = run(&["run", "--mem", "64M", "dirty", "--", "16", "32", "2"]);
    let text = stdout(&out);
    assert!(
        text.contains("dirty: working set 16 MiB (4096 pages) touched, rate 32 MiB/s"),
        "{text}"
    );
    let rate: f64 = text
        .lines()
        .rfind(|l| l.ends_with("MiB/s") && l.contains("written"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|r| r.parse().ok())
        .expect("a progress line");
    assert!((24.0..=40.0).contains(&rate), "rate {rate} MiB/s, asked 32: {text}");
    assert!(text.contains("dirty: done"), "{text}");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn dirty_without_arguments_explains_its_usage() {
    let out = run(&["run", "dirty"]);
    assert!(stdout(&out).contains("usage: dirty"), "{}", stdout(&out));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn micro_prints_every_row() {
    let out = run(&["run", "micro"]);
    let text = stdout(&out);
    for (name, _) in xcloud_bench_kernels::ROWS {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("micro {name} "))),
            "{name} missing: {text}"
        );
    }
    assert_eq!(out.status.code(), Some(0));
}
