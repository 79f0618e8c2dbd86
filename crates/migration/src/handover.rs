//! The moments where the two ends agree: SYNC (everything sent so far is applied), the
//! source's pause for the switch, and the handover (STATE, GO, RUNNING).

use crate::error::MigrationError;
use crate::wire::{self, Kind, WireError};
use std::io::{Read, Write};
use xcloud_vm_core::report::flatten_error;
use xcloud_vmm::VmHandle;

/// SYNC: returns once the destination has applied every frame sent before it.
pub(crate) fn sync<S: Read + Write>(stream: &mut S) -> Result<(), MigrationError> {
    wire::write_frame(stream, Kind::Sync, &[])?;
    stream.flush().map_err(WireError::from)?;
    let mut buf = Vec::new();
    wire::expect_frame(stream, &mut buf, Kind::Synced, "SYNCED")?;
    Ok(())
}

/// Pauses a running source for the switch and returns what every failure before the handover
/// goes through: it resumes the source (when it was running) and passes the error on.
pub(crate) fn pause_for_switch(
    handle: &VmHandle,
    was_running: bool,
) -> Result<impl Fn(MigrationError) -> MigrationError + Copy + '_, MigrationError> {
    if was_running {
        handle.pause()?;
    }
    Ok(move |e: MigrationError| {
        if was_running {
            let _ = handle.resume();
        }
        e
    })
}

/// How a handover failed.
pub(crate) enum HandoverError {
    /// The destination refused or could not be reached before it could start the VM: the
    /// source may run it again.
    NotStarted(MigrationError),
    /// The destination may run the VM: the source must not.
    Unknown(String),
}

impl HandoverError {
    pub fn into_error(self, resume_source: impl FnOnce(MigrationError) -> MigrationError) -> MigrationError {
        match self {
            HandoverError::NotStarted(e) => resume_source(e),
            HandoverError::Unknown(why) => MigrationError::OutcomeUnknown(why),
        }
    }
}

/// Sends the STATE and, right behind it, GO ("start it once the state is applied"), then waits
/// for RUNNING: one round trip of downtime. A REFUSE means the destination did not start the
/// VM; silence or a broken link after GO leave the outcome unknown.
pub(crate) fn hand_over<S: Read + Write>(stream: &mut S, state: &[u8]) -> Result<(), HandoverError> {
    wire::write_frame(stream, Kind::State, state)
        .and_then(|_| stream.flush().map_err(WireError::from))
        .map_err(|e| HandoverError::NotStarted(e.into()))?;
    // From here on the destination may run the VM: the source must never run it again unless
    // the destination says it did not start it.
    let mut buf = Vec::new();
    let answer = wire::write_frame(stream, Kind::Go, &[])
        .and_then(|_| stream.flush().map_err(WireError::from))
        .and_then(|_| wire::read_frame(stream, &mut buf));
    match answer {
        Ok(Kind::Running) => Ok(()),
        Err(WireError::Refused(why)) => Err(HandoverError::NotStarted(MigrationError::Refused(why))),
        Ok(other) => Err(HandoverError::Unknown(format!("it sent {other:?}"))),
        Err(e) => Err(HandoverError::Unknown(flatten_error(&e))),
    }
}
