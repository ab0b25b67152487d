//! Training, first part: datasets. A JSONL file in the chat format
//! (`{"messages": [{"role", "content"}, …]}`) or the prompt/completion
//! format (`{"prompt", "completion"}`) is validated line by line as it
//! streams in ([`DatasetValidator`]), with a capped report of line numbers
//! and reasons, row and token counts, and a cost estimate where a price per
//! training token is known. Jobs and trainers are not here yet.

pub mod dataset;

pub use dataset::{
    Dataset, DatasetFormat, DatasetRepository, DatasetStoreError, DatasetValidator, LineIssue,
    TokenCounter, ValidationReport, MAX_REPORTED_ISSUES,
};
