//! What `xcloud` exits with, for scripts (docs/cloud-api.md, "Exit status"), and the API's
//! error answers that decide it.

use crate::cli_config;

/// Something not covered below failed.
pub const FAILED: u8 = 1;
/// The command line, the config file or the request was wrong (clap exits 2 too).
pub const USAGE: u8 = 2;
/// What the command names does not exist (or is not the caller's).
pub const NOT_FOUND: u8 = 3;
/// No key, a wrong key, an admin route, or a quota.
pub const REFUSED: u8 = 4;
/// The resource is not in a state that allows it, or the name is taken.
pub const CONFLICT: u8 = 5;
/// xcloudd (or the host it had to ask) could not be reached or did not answer in time.
pub const UNREACHABLE: u8 = 6;
/// A drain, evacuation or re-placement left some VMs where they were.
pub const PARTIAL: i32 = 7;

/// An error answer of the API.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiError {
    /// Its HTTP status.
    pub status: u16,
    /// Its message.
    pub message: String,
}

/// The exit status for an error of any command.
pub fn of(error: &anyhow::Error) -> u8 {
    use xcloud_control::client::ClientError;
    for cause in error.chain() {
        if let Some(api) = cause.downcast_ref::<ApiError>() {
            return match api.status {
                404 => NOT_FOUND,
                401 | 403 => REFUSED,
                409 => CONFLICT,
                408 | 502..=504 => UNREACHABLE,
                400..=499 => USAGE,
                _ => FAILED,
            };
        }
        if let Some(ClientError::Connect { .. } | ClientError::Http { .. }) = cause.downcast_ref::<ClientError>() {
            return UNREACHABLE;
        }
        if cause.downcast_ref::<cli_config::ConfigError>().is_some() {
            return USAGE;
        }
    }
    FAILED
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16) -> anyhow::Error {
        anyhow::Error::new(ApiError {
            status,
            message: "m".into(),
        })
        .context("calling xcloudd")
    }

    #[test]
    fn each_answer_has_its_status() {
        let table = [(404, NOT_FOUND), (401, REFUSED), (403, REFUSED), (409, CONFLICT)];
        for (status, code) in table
            .into_iter()
            .chain([(400, USAGE), (413, USAGE), (503, UNREACHABLE), (500, FAILED)])
        {
            assert_eq!(of(&api(status)), code, "HTTP {status}");
        }
        assert_eq!(of(&anyhow::anyhow!("a local failure")), FAILED);
        assert_eq!(of(&cli_config::ConfigError::NoPlace.into()), USAGE);
    }
}
