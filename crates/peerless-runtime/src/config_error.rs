//! The one configuration error type, shared by every section of a run's configuration (the
//! run's own in `config`, the function runtime's in `function::config`): each names the key at
//! fault. A leaf module, so both can use it without depending on each other.

use std::path::PathBuf;

/// Configuration errors; each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML did not parse or named an unknown key (the message names it).
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// File or "command line".
        origin: String,
        /// The parser's message, which names the key and position.
        message: String,
    },
    /// A value out of its allowed range.
    #[error("{key} = {value}: {reason}")]
    Invalid {
        /// Dotted key path.
        key: String,
        /// The offending value.
        value: String,
        /// What is allowed.
        reason: String,
    },
}
