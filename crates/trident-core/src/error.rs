//! Errors of the core, each mapped to one status code by the front doors.

use crate::model::EnvironmentId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("execution environment {0} does not exist")]
    EnvironmentNotFound(EnvironmentId),
    #[error("{0}: no runner found with this id")]
    RunnerNotFound(String),
    #[error("execution {0} does not exist or was already used")]
    ExecutionNotFound(String),
    /// No idle runner could be had in time; clients know this as `NOMAD_OVERLOAD`.
    #[error("{0}")]
    Overloaded(String),
    /// The client holds too much of something bounded (prepared executions); HTTP 429.
    #[error("{0}")]
    TooManyPending(String),
    /// The file cannot be listed or read (missing, or no permission); HTTP 424.
    #[error("file not found or insufficient permissions: {0}")]
    FileUnavailable(String),
    /// Some files of a copy could not be written (the others were); the reference answers
    /// 500 `UNKNOWN`.
    #[error("{0}")]
    FileCopyFailed(String),
    /// What the API acknowledges could not be stored; nothing changed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Runners of the environment cannot be had, and the message says why (e.g. its image
    /// could not be pulled); HTTP 500, answered at once rather than after `claim_wait`.
    #[error("{0}")]
    EnvironmentUnavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<crate::backend::BackendError> for Error {
    fn from(e: crate::backend::BackendError) -> Error {
        use crate::backend::BackendError;
        match e {
            BackendError::FileUnavailable(m) => Error::FileUnavailable(m),
            BackendError::Invalid(m) => Error::BadRequest(m),
            BackendError::CopyFailed(m) => Error::FileCopyFailed(m),
            BackendError::Failed(m) => Error::Internal(m),
        }
    }
}

impl Error {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }
}
