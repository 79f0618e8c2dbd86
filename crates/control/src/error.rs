//! The control plane's errors, and how each reaches an HTTP client: a status code and one JSON
//! object `{"error": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// What went wrong with a request or inside the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No API key, or one that is not known.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may not do this (a tenant calling an admin operation).
    #[error("{0}")]
    Forbidden(String),
    /// No such resource for this caller (another tenant's resources are not found either).
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts the resource's state (a name in use, a VM already running).
    #[error("{0}")]
    Conflict(String),
    /// A malformed request: bad JSON, a bad name, an image that is not a PVH ELF.
    #[error("{0}")]
    BadRequest(String),
    /// The request did not arrive in time.
    #[error("{0}")]
    Timeout(String),
    /// The route exists, not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The tenant's quota does not allow it.
    #[error("{0}")]
    Quota(String),
    /// An upload over the size limit.
    #[error("{0}")]
    TooLarge(String),
    /// A body of a type the route does not take (JSON without `Content-Type: application/json`).
    #[error("{0}")]
    UnsupportedType(String),
    /// The VMM of a VM failed or did not answer.
    #[error("{0}")]
    Vmm(String),
    /// The state file could not be read or written.
    #[error("state store: {0}")]
    Store(String),
    /// The cluster (etcd, or the host a VM lives on) could not be reached or did not agree.
    #[error("cluster: {0}")]
    Cluster(String),
    /// A file of the daemon's could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What the daemon was doing.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl ControlError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::Quota(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Vmm(_) => StatusCode::BAD_GATEWAY,
            Self::Store(_) | Self::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Cluster(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// An I/O error with what the daemon was doing.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<redb::Error> for ControlError {
    fn from(e: redb::Error) -> Self {
        Self::Store(e.to_string())
    }
}

macro_rules! store_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for ControlError {
            fn from(e: $t) -> Self {
                Self::Store(e.to_string())
            }
        }
    )*};
}
store_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<etcd_client::Error> for ControlError {
    fn from(e: etcd_client::Error) -> Self {
        Self::Cluster(format!("etcd: {e}"))
    }
}

impl From<axum::extract::rejection::JsonRejection> for ControlError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection;
        match e {
            JsonRejection::MissingJsonContentType(_) => {
                Self::UnsupportedType("this route takes a JSON body: Content-Type: application/json".into())
            }
            e => Self::BadRequest(format!("malformed request body: {}", e.body_text())),
        }
    }
}

impl From<axum::extract::rejection::QueryRejection> for ControlError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        Self::BadRequest(format!("malformed query: {}", e.body_text()))
    }
}

impl From<axum::extract::rejection::PathRejection> for ControlError {
    fn from(e: axum::extract::rejection::PathRejection) -> Self {
        Self::BadRequest(format!("malformed path: {}", e.body_text()))
    }
}

/// The body of every error answer.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// One line: what went wrong.
    pub error: String,
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Store(_) | Self::Io { .. } => tracing::error!("{self}"),
            Self::Vmm(_) | Self::Cluster(_) => tracing::warn!("{self}"),
            _ => {}
        }
        (
            status,
            axum::Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}
