//! The host: opening KVM with errors that say what to do, and what this host's virtualization
//! is (bare-metal KVM, nested VMX/SVM, PVM, none) for `xcloud doctor`.

use kvm_ioctls::{Cap, Kvm};
use std::os::fd::FromRawFd;
use std::path::Path;

/// Where KVM lives; `XCLOUD_KVM_DEVICE` overrides it (tests use it to check the errors).
pub fn kvm_device_path() -> String {
    std::env::var("XCLOUD_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{path} does not exist: this host offers no KVM. Load a KVM module (modprobe kvm_intel, kvm_amd or kvm_pvm) or run on a host with virtualization; `xcloud doctor` tells more")]
    /// The KVM device is missing.
    NoKvm {
        /// The KVM device's path.
        path: String,
    },
    #[error("no permission to open {path}: run as root or add your user to the group that owns it (usermod -aG kvm $USER, then log in again)")]
    /// The KVM device cannot be opened by this user.
    NoPermission {
        /// The KVM device's path.
        path: String,
    },
    #[error("cannot open {path}")]
    /// The KVM device cannot be opened.
    Open {
        /// The KVM device's path.
        path: String,
        #[source]
        /// The system's answer.
        source: std::io::Error,
    },
    #[error("{path} speaks KVM API version {found}, xcloud needs version 12")]
    /// A KVM API version other than 12.
    ApiVersion {
        /// The KVM device's path.
        path: String,
        /// The version it reports.
        found: i32,
    },
    #[error("this KVM lacks {0}, which xcloud needs")]
    /// KVM lacks a capability the VMM needs.
    MissingCapability(&'static str),
}

/// Opens KVM and checks the API version and the capabilities the VMM relies on.
pub fn open_kvm() -> Result<Kvm, HostError> {
    let path = kvm_device_path();
    let c_path = std::ffi::CString::new(path.clone()).map_err(|_| HostError::NoKvm { path: path.clone() })?;
    let fd = Kvm::open_with_cloexec_at(&c_path, true).map_err(|e| {
        let io = std::io::Error::from_raw_os_error(e.errno());
        match io.kind() {
            std::io::ErrorKind::NotFound => HostError::NoKvm { path: path.clone() },
            std::io::ErrorKind::PermissionDenied => HostError::NoPermission { path: path.clone() },
            _ => HostError::Open {
                path: path.clone(),
                source: io,
            },
        }
    })?;
    // SAFETY: `fd` was just opened on the KVM device and is owned by nothing else.
    let kvm = unsafe { Kvm::from_raw_fd(fd) };
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(HostError::ApiVersion { path, found: version });
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(HostError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// Capabilities the VMM cannot work without.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
];

/// Capabilities later engines use (reported by `doctor`): KVM capability number, name, use.
pub const USEFUL_CAPS: &[(u32, &str, &str)] = &[
    (
        kvm_bindings::KVM_CAP_IOEVENTFD,
        "KVM_CAP_IOEVENTFD",
        "doorbells without a VMM exit handler",
    ),
    (
        kvm_bindings::KVM_CAP_PIT2,
        "KVM_CAP_PIT2",
        "in-kernel PIT for guests that want one",
    ),
    (
        kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
        "KVM_CAP_SPLIT_IRQCHIP",
        "userspace IOAPIC",
    ),
    (
        kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
        "cheaper dirty logging for live migration",
    ),
    (
        kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
        "KVM_CAP_DIRTY_LOG_RING",
        "dirty page ring for live migration",
    ),
    (
        kvm_bindings::KVM_CAP_TSC_CONTROL,
        "KVM_CAP_TSC_CONTROL",
        "keep a guest's TSC rate across hosts",
    ),
    (
        kvm_bindings::KVM_CAP_GET_TSC_KHZ,
        "KVM_CAP_GET_TSC_KHZ",
        "guest clock calibration",
    ),
    (
        kvm_bindings::KVM_CAP_IMMEDIATE_EXIT,
        "KVM_CAP_IMMEDIATE_EXIT",
        "prompt vCPU kicks",
    ),
    (
        kvm_bindings::KVM_CAP_NESTED_STATE,
        "KVM_CAP_NESTED_STATE",
        "snapshot of nested virtualization state",
    ),
];

/// What virtualization this host offers to xcloud.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Virtualization {
    /// KVM on hardware virtualization, on bare metal.
    BareMetal {
        /// "Intel" or "AMD".
        vendor: &'static str,
    },
    /// KVM on hardware virtualization that a hypervisor below passes through (nested VMX/SVM).
    Nested {
        /// "Intel" or "AMD".
        vendor: &'static str,
    },
    /// KVM by PVM: no hardware virtualization, guests' kernel mode is emulated.
    Pvm,
    /// KVM is loaded but from a module xcloud does not know.
    OtherKvm,
    /// No KVM at all.
    None,
}

impl Virtualization {
    /// Whether a stock Linux kernel can run as a guest here at useful speed.
    pub fn runs_linux_guests(&self) -> bool {
        matches!(self, Virtualization::BareMetal { .. } | Virtualization::Nested { .. })
    }
}

impl std::fmt::Display for Virtualization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Virtualization::BareMetal { vendor } => write!(f, "bare-metal KVM ({vendor})"),
            Virtualization::Nested { vendor } => {
                write!(f, "nested KVM ({vendor} passed through by the hypervisor below)")
            }
            Virtualization::Pvm => write!(
                f,
                "PVM (KVM without hardware virtualization; guest kernel mode is emulated)"
            ),
            Virtualization::OtherKvm => write!(f, "KVM of an unknown kind"),
            Virtualization::None => write!(f, "none (no KVM module loaded)"),
        }
    }
}

/// Detects the virtualization from the loaded modules and the CPU flags.
pub fn detect_virtualization() -> Virtualization {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let under_hypervisor = flags.split_whitespace().any(|f| f == "hypervisor");
    let hw = |vendor| {
        if under_hypervisor {
            Virtualization::Nested { vendor }
        } else {
            Virtualization::BareMetal { vendor }
        }
    };
    if module("kvm_pvm") {
        Virtualization::Pvm
    } else if module("kvm_intel") {
        hw("Intel VMX")
    } else if module("kvm_amd") {
        hw("AMD SVM")
    } else if module("kvm") || Path::new(&kvm_device_path()).exists() {
        Virtualization::OtherKvm
    } else {
        Virtualization::None
    }
}

/// The nice value of threads that move a VM's state (migration streams, teardown): the lowest
/// CPU priority, so that on a host where they share cores with vCPUs the vCPUs win every
/// contest for a core. Measured: a receiver at normal priority took the migrating guest's core
/// for whole scheduler ticks (4 ms at HZ=250) during pre-copy.
pub const BACKGROUND_NICE: libc::c_int = 19;

/// Lowers every thread of this process whose name starts with `prefix` (all of them for "")
/// to [`BACKGROUND_NICE`]. Best effort, as [`lower_thread_priority`].
pub fn lower_threads_named(prefix: &str) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<libc::id_t>().ok()) else {
            continue;
        };
        if prefix.is_empty()
            || std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.starts_with(prefix))
        {
            lower_thread_priority(tid);
        }
    }
}

/// The thread KVM starts in the VMM's process at a VM's first KVM_RUN to undo split huge
/// pages (NX huge page recovery). It inherits the priority of the thread that ran first: a
/// vCPU's, so it competes with vCPUs unless lowered.
pub const KVM_NX_RECOVERY_THREAD: &str = "kvm-nx-lpage-re";

/// Lowers thread `tid` (0: the calling thread) to [`BACKGROUND_NICE`]. Threads it creates
/// afterwards inherit the priority; raising it back needs CAP_SYS_NICE, so callers run such
/// work on a thread of its own. Best effort: a failure leaves the priority as it was.
pub fn lower_thread_priority(tid: libc::id_t) {
    // SAFETY: setpriority only changes the scheduling priority of one thread of this process
    // (on Linux PRIO_PROCESS with a thread id, or 0, names a single thread); it touches no
    // memory.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE) };
}
