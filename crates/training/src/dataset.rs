//! Dataset validation and the dataset record.

use muse_core::{Page, PageRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Issues kept in a report; the count of all of them is kept too.
pub const MAX_REPORTED_ISSUES: usize = 100;
/// Longest line accepted, in bytes.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Fewest valid rows a dataset needs (OpenAI's minimum).
pub const MIN_ROWS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// `{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]}`
    Chat,
    /// `{"prompt": "…", "completion": "…"}`
    PromptCompletion,
}

impl DatasetFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetFormat::Chat => "chat",
            DatasetFormat::PromptCompletion => "prompt_completion",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "chat" => Some(Self::Chat),
            "prompt_completion" => Some(Self::PromptCompletion),
            _ => None,
        }
    }
}

/// One problem, at a 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineIssue {
    pub line: u64,
    pub reason: String,
}

/// Counts tokens of a text (the target model's tokenizer when known).
pub trait TokenCounter: Send + Sync {
    fn count(&self, text: &str) -> u64;
    /// `tokenizer:<model>` or `estimate`.
    fn method(&self) -> String;
}

/// About four characters per token: used when no tokenizer is known.
pub struct EstimateCounter;

impl TokenCounter for EstimateCounter {
    fn count(&self, text: &str) -> u64 {
        (text.chars().count() as u64).div_ceil(4)
    }
    fn method(&self) -> String {
        "estimate".into()
    }
}

/// What a validation found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationReport {
    pub format: Option<DatasetFormat>,
    pub rows: u64,
    pub tokens: u64,
    pub token_method: String,
    /// At most [`MAX_REPORTED_ISSUES`].
    pub issues: Vec<LineIssue>,
    pub issue_count: u64,
    pub valid: bool,
}

/// Validates a JSONL dataset line by line, keeping only counters and the
/// first issues: memory does not grow with the file.
pub struct DatasetValidator<'a> {
    counter: &'a dyn TokenCounter,
    format: Option<DatasetFormat>,
    line: u64,
    rows: u64,
    tokens: u64,
    issues: Vec<LineIssue>,
    issue_count: u64,
}

fn text_of(v: &Value) -> Option<&str> {
    v.as_str()
}

impl<'a> DatasetValidator<'a> {
    pub fn new(counter: &'a dyn TokenCounter) -> Self {
        Self {
            counter,
            format: None,
            line: 0,
            rows: 0,
            tokens: 0,
            issues: Vec::new(),
            issue_count: 0,
        }
    }

    fn issue(&mut self, reason: impl Into<String>) {
        self.issue_count += 1;
        if self.issues.len() < MAX_REPORTED_ISSUES {
            self.issues.push(LineIssue {
                line: self.line,
                reason: reason.into(),
            });
        }
    }

    /// Checks the next line (without its newline).
    pub fn push_line(&mut self, raw: &[u8]) {
        self.line += 1;
        if raw.len() > MAX_LINE_BYTES {
            self.issue(format!("the line is longer than {MAX_LINE_BYTES} bytes"));
            return;
        }
        let Ok(text) = std::str::from_utf8(raw) else {
            self.issue("not UTF-8");
            return;
        };
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return;
        }
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.issue(format!("not valid JSON: {e}"));
                return;
            }
        };
        let Some(obj) = v.as_object() else {
            self.issue("a line must be a JSON object");
            return;
        };
        let format = if obj.contains_key("messages") {
            DatasetFormat::Chat
        } else if obj.contains_key("prompt") || obj.contains_key("completion") {
            DatasetFormat::PromptCompletion
        } else {
            self.issue("expected \"messages\" (chat format) or \"prompt\" and \"completion\"");
            return;
        };
        match self.format {
            None => self.format = Some(format),
            Some(f) if f != format => {
                self.issue(format!(
                    "this line is in the {} format but the file started in the {} format",
                    format.as_str(),
                    f.as_str()
                ));
                return;
            }
            Some(_) => {}
        }
        let tokens = match format {
            DatasetFormat::Chat => self.chat(&v),
            DatasetFormat::PromptCompletion => self.prompt_completion(&v),
        };
        if let Some(t) = tokens {
            self.rows += 1;
            self.tokens += t;
        }
    }

    fn chat(&mut self, v: &Value) -> Option<u64> {
        let Some(messages) = v["messages"].as_array() else {
            self.issue("\"messages\" must be an array");
            return None;
        };
        if messages.is_empty() {
            self.issue("\"messages\" is empty");
            return None;
        }
        let mut tokens = 0;
        let mut has_assistant = false;
        for (i, m) in messages.iter().enumerate() {
            let role = m["role"].as_str();
            match role {
                Some("system" | "user" | "assistant") => {}
                Some(other) => {
                    self.issue(format!(
                        "messages[{i}].role {other:?} is not system, user or assistant"
                    ));
                    return None;
                }
                None => {
                    self.issue(format!("messages[{i}] has no \"role\""));
                    return None;
                }
            }
            let Some(content) = text_of(&m["content"]) else {
                self.issue(format!("messages[{i}].content must be a string"));
                return None;
            };
            has_assistant |= role == Some("assistant");
            tokens += self.counter.count(content);
        }
        if !has_assistant {
            self.issue("no assistant message to learn from");
            return None;
        }
        Some(tokens)
    }

    fn prompt_completion(&mut self, v: &Value) -> Option<u64> {
        let (Some(p), Some(c)) = (text_of(&v["prompt"]), text_of(&v["completion"])) else {
            self.issue("\"prompt\" and \"completion\" must both be strings");
            return None;
        };
        if c.trim().is_empty() {
            self.issue("\"completion\" is empty");
            return None;
        }
        Some(self.counter.count(p) + self.counter.count(c))
    }

    /// Counts a line that was longer than [`MAX_LINE_BYTES`] (and not kept).
    pub fn push_too_long(&mut self) {
        self.line += 1;
        self.issue(format!("the line is longer than {MAX_LINE_BYTES} bytes"));
    }

    pub fn finish(self) -> ValidationReport {
        let mut issues = self.issues;
        let mut issue_count = self.issue_count;
        if self.rows < MIN_ROWS {
            issue_count += 1;
            if issues.len() < MAX_REPORTED_ISSUES {
                issues.push(LineIssue {
                    line: 0,
                    reason: format!("{} valid rows; at least {MIN_ROWS} are needed", self.rows),
                });
            }
        }
        ValidationReport {
            format: self.format,
            rows: self.rows,
            tokens: self.tokens,
            token_method: self.counter.method(),
            valid: issue_count == 0,
            issues,
            issue_count,
        }
    }
}

/// Feeds a [`DatasetValidator`] from chunks of any size (as they arrive
/// from the network), cutting lines at `\n`; memory stays under one line.
pub struct LineSplitter<'a> {
    validator: DatasetValidator<'a>,
    partial: Vec<u8>,
    too_long: bool,
}

impl<'a> LineSplitter<'a> {
    pub fn new(validator: DatasetValidator<'a>) -> Self {
        Self {
            validator,
            partial: Vec::new(),
            too_long: false,
        }
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(at) = chunk.iter().position(|b| *b == b'\n') {
            self.take(&chunk[..at]);
            self.end_line();
            chunk = &chunk[at + 1..];
        }
        self.take(chunk);
    }

    fn take(&mut self, bytes: &[u8]) {
        if self.too_long {
            return;
        }
        if self.partial.len() + bytes.len() > MAX_LINE_BYTES {
            self.too_long = true;
            self.partial = Vec::new();
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self) {
        if self.too_long {
            self.validator.push_too_long();
            self.too_long = false;
        } else {
            self.validator.push_line(&self.partial);
            self.partial.clear();
        }
    }

    pub fn finish(mut self) -> ValidationReport {
        if self.too_long || !self.partial.is_empty() {
            self.end_line();
        }
        self.validator.finish()
    }
}

/// A stored dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub id: Uuid,
    pub user_id: Uuid,
    /// The uploaded file's name, for display only (never a path).
    pub name: String,
    pub size_bytes: u64,
    pub report: ValidationReport,
    /// USD, where a training price is known for `base_model`.
    pub estimated_cost_usd: Option<f64>,
    pub base_model: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetStoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

/// Storage of dataset records (the files live in the data directory under
/// the dataset id). Every call is scoped to one user.
pub trait DatasetRepository: Send + Sync + 'static {
    fn insert(&self, d: &Dataset) -> Result<(), DatasetStoreError>;
    fn get(&self, user_id: Uuid, id: Uuid) -> Result<Option<Dataset>, DatasetStoreError>;
    fn list(&self, user_id: Uuid, page: PageRequest) -> Result<Page<Dataset>, DatasetStoreError>;
    /// Deletes the record; `false` if the user has no such dataset.
    fn delete(&self, user_id: Uuid, id: Uuid) -> Result<bool, DatasetStoreError>;
    /// Bytes of all the user's datasets.
    fn total_bytes(&self, user_id: Uuid) -> Result<u64, DatasetStoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str) -> ValidationReport {
        let mut v = DatasetValidator::new(&EstimateCounter);
        for line in text.as_bytes().split(|b| *b == b'\n') {
            v.push_line(line);
        }
        v.finish()
    }

    #[test]
    fn a_good_chat_file_is_counted() {
        let line = r#"{"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}"#;
        let file = [line; 12].join("\n") + "\n";
        let r = validate(&file);
        assert!(r.valid, "{r:?}");
        assert_eq!((r.rows, r.format), (12, Some(DatasetFormat::Chat)));
        assert_eq!(r.tokens, 12 * (2 + 2));
    }

    #[test]
    fn every_broken_line_is_reported_with_its_number() {
        let good = r#"{"prompt": "2+2", "completion": "4"}"#;
        let mut lines = vec![good; 10];
        lines.insert(2, "{not json");
        lines.insert(4, r#"{"prompt": "x", "completion": ""}"#);
        lines.insert(6, r#"{"messages": [{"role": "user", "content": "hi"}]}"#);
        lines.insert(8, r#"[1, 2]"#);
        let r = validate(&lines.join("\n"));
        assert!(!r.valid);
        let at: Vec<u64> = r.issues.iter().map(|i| i.line).collect();
        assert_eq!(at, [3, 5, 7, 9]);
        assert!(r.issues[0].reason.starts_with("not valid JSON"));
        assert!(r.issues[2].reason.contains("format"));
        assert_eq!(r.rows, 10);
    }

    #[test]
    fn chunks_split_anywhere_give_the_same_report() {
        let good = r#"{"prompt": "q", "completion": "a"}"#;
        let mut lines = vec![good; 11];
        lines.insert(5, "{broken");
        let file = lines.join("\r\n");
        let whole = validate(&file);
        for size in [1, 2, 7, 64, 4096] {
            let mut s = LineSplitter::new(DatasetValidator::new(&EstimateCounter));
            for c in file.as_bytes().chunks(size) {
                s.feed(c);
            }
            assert_eq!(s.finish(), whole, "chunks of {size}");
        }
        assert_eq!((whole.rows, whole.issues[0].line), (11, 6));
        let mut s = LineSplitter::new(DatasetValidator::new(&EstimateCounter));
        s.feed(good.as_bytes());
        s.feed(b"\n");
        s.feed(&vec![b'x'; MAX_LINE_BYTES + 10]);
        s.feed(b"\n");
        s.feed(good.as_bytes());
        let r = s.finish();
        assert_eq!(r.issues[0].line, 2);
        assert!(r.issues[0].reason.contains("longer"));
        assert_eq!(r.rows, 2);
    }

    #[test]
    fn reports_are_capped_and_small_files_refused() {
        let r = validate(&"x\n".repeat(500));
        assert_eq!((r.issues.len(), r.issue_count), (MAX_REPORTED_ISSUES, 501));
        let r = validate(r#"{"prompt": "a", "completion": "b"}"#);
        assert!(!r.valid && r.issues[0].reason.contains("at least 10"));
        let r = validate(r#"{"messages": [{"role": "robot", "content": "x"}]}"#);
        assert!(r.issues[0].reason.contains("robot"));
    }
}
