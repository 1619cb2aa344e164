//! Typed errors of the data pipeline. Every message is one line that names the file at fault.
use thiserror::Error;

/// Everything that can go wrong while loading data.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// A file could not be read (missing, permissions, ...).
    #[error("{path}: cannot read file: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The annotation file is not valid JSON or lacks a required field; `detail` carries the
    /// JSON line and column as reported by serde_json.
    #[error("{path}: invalid COCO annotation file: {detail}")]
    Json {
        path: String,
        line: usize,
        column: usize,
        detail: String,
    },
    /// The annotation file is valid JSON but inconsistent (unknown image, unsafe file name, ...).
    #[error("{path}: {detail}")]
    Annotation { path: String, detail: String },
    /// A COCO results file is not valid JSON, not a list, or has a malformed detection.
    #[error("{path}: {source}")]
    Results {
        path: String,
        #[source]
        source: crate::results::ResultsError,
    },
    /// An image file exists but is corrupt, truncated or in an unsupported format.
    #[error("{path}: cannot decode image: {detail}")]
    Decode { path: String, detail: String },
    /// Invalid loader settings.
    #[error("invalid loader setting: {0}")]
    Config(String),
    /// A bug: a worker panicked. Reported instead of unwinding across the FFI boundary.
    #[error("internal error in the data loader: {0}")]
    Internal(String),
}

impl LoaderError {
    /// The file the error is about, if any (used for the skip list).
    pub fn path(&self) -> Option<&str> {
        match self {
            LoaderError::Io { path, .. }
            | LoaderError::Json { path, .. }
            | LoaderError::Annotation { path, .. }
            | LoaderError::Results { path, .. }
            | LoaderError::Decode { path, .. } => Some(path),
            LoaderError::Config(_) | LoaderError::Internal(_) => None,
        }
    }

    /// The message without the leading file name (used for the skip list).
    pub fn reason(&self) -> String {
        match self {
            LoaderError::Io { source, .. } => format!("cannot read file: {source}"),
            LoaderError::Decode { detail, .. } => format!("cannot decode image: {detail}"),
            other => other.to_string(),
        }
    }
}

pub type Result<T, E = LoaderError> = std::result::Result<T, E>;
