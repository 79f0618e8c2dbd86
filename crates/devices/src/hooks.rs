//! Where extensions of the VMM meet the devices (docs/extensions.md): the NIC hands each frame,
//! and the disk each request, to a hook the VMM sets, which answers what becomes of it. The
//! devices know nothing of modules, budgets or WebAssembly; the VMM's extension registry
//! implements these traits.

/// Which way a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketDirection {
    /// Sent by the guest, on its way to the TAP.
    FromGuest,
    /// From the TAP, on its way into the guest.
    ToGuest,
}

impl PacketDirection {
    /// Its number in the hook ABI (0 from the guest, 1 to it).
    pub fn code(self) -> i32 {
        match self {
            Self::FromGuest => 0,
            Self::ToGuest => 1,
        }
    }
}

/// What becomes of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketVerdict {
    /// It goes on as it was.
    Pass,
    /// It goes no further: neither the guest nor the TAP sees it.
    Drop,
    /// It goes on with the bytes the hook wrote over its head.
    Rewrite,
}

/// Sees every frame of a NIC.
pub trait PacketHook: Send + Sync {
    /// How many bytes from the start of each Ethernet frame the hook wants (0: it takes no
    /// frames now, and the NIC moves them untouched, with no copy).
    fn snap_len(&self) -> usize;

    /// Frame `len` bytes long on NIC `nic`, going `direction`; `head` holds its first
    /// `min(len, snap_len())` bytes, which the hook may rewrite (answering
    /// [`PacketVerdict::Rewrite`]).
    fn packet(&self, nic: u32, direction: PacketDirection, head: &mut [u8], len: usize) -> PacketVerdict;
}

/// What becomes of a block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockVerdict {
    /// The disk does it.
    Allow,
    /// The disk refuses it: the guest sees an I/O error and the image is untouched.
    Refuse,
}

/// Sees every block request of a disk before the disk does it.
pub trait BlockHook: Send + Sync {
    /// Whether any module takes block requests now (when not, requests go straight through).
    fn active(&self) -> bool;

    /// Request `kind` (virtio-blk's request types) at `sector` with `bytes` of data on disk
    /// `disk`.
    fn request(&self, disk: u32, kind: u32, sector: u64, bytes: u64) -> BlockVerdict;

    /// Whether a module transforms the data of reads and writes (encryption at rest): each
    /// write's data then goes to the disk from a copy the hook transformed, and each read's is
    /// transformed in guest memory once it is there.
    fn transforms_data(&self) -> bool {
        false
    }

    /// Transforms `data`, a read's (after the disk) or a write's (before it) at `sector`.
    /// false: it could not be transformed (a module failed), and the request fails rather than
    /// reach the disk or the guest untransformed.
    fn transform(&self, _disk: u32, _kind: u32, _sector: u64, _data: &mut [u8]) -> bool {
        true
    }
}
