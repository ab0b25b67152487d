//! Tool calling on local models: the tool-call formats chat templates teach
//! their models, read back from the generated text, and the guide that
//! makes a model write a call when the request requires one.
//!
//! The format is recognised from the chat template itself:
//! - **Hermes** (Qwen2.5, Qwen3, SmolLM3, Hermes-2-Pro, …): each call is
//!   `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`;
//! - **Llama 3.1 / 3.2**: the whole answer is
//!   `{"name": …, "parameters": {…}}` (optionally after `<|python_tag|>`,
//!   several separated by `;`);
//! - **Mistral** (v0.3, Nemo): `[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]`.
//!
//! A template that takes `tools` in any other way is refused with a clear
//! error rather than guessed at.

use serde_json::Value;

use super::guide::{Guide, JsonMachine, Segment};
use crate::types::ToolCall;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    LlamaJson,
    Mistral,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_TAG: &str = "[TOOL_CALLS]";

impl ToolFormat {
    /// The format a chat template teaches, read from its source.
    pub fn of_template(source: &str) -> Option<Self> {
        if source.contains(HERMES_OPEN) {
            Some(Self::Hermes)
        } else if source.contains(MISTRAL_TAG) {
            Some(Self::Mistral)
        } else if source.contains("\"parameters\": dictionary") || source.contains(PYTHON_TAG) {
            Some(Self::LlamaJson)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::LlamaJson => "llama3_json",
            Self::Mistral => "mistral",
        }
    }

    /// Splits an answer into its text and the calls it makes. Calls must
    /// name one of `tools` and carry JSON; an answer whose calls cannot be
    /// read is text, as written.
    pub fn parse(self, text: &str, tools: &[String], ids: &mut CallIds) -> (String, Vec<ToolCall>) {
        let parsed = match self {
            Self::Hermes => parse_hermes(text),
            Self::LlamaJson => parse_llama(text),
            Self::Mistral => parse_mistral(text),
        };
        match parsed {
            Some((content, calls))
                if !calls.is_empty() && calls.iter().all(|(n, _)| tools.contains(n)) =>
            {
                let calls = calls
                    .into_iter()
                    .map(|(name, arguments)| ToolCall {
                        id: ids.next(),
                        name,
                        arguments,
                    })
                    .collect();
                (content, calls)
            }
            _ => (text.to_string(), Vec::new()),
        }
    }

    /// The shape of one call to one of `names`, for `tool_choice`
    /// `required` or a named function: the model writes it, nothing else.
    pub fn required_call(self, names: &[String]) -> Guide {
        let names =
            |close: &str| Segment::OneOf(names.iter().map(|n| format!("{n}{close}")).collect());
        let args = || Segment::Json(JsonMachine::new(true));
        match self {
            Self::Hermes => Guide::new(vec![
                Segment::Literal(format!("{HERMES_OPEN}\n{{\"name\": \"")),
                names("\""),
                Segment::Literal(", \"arguments\": ".into()),
                args(),
                Segment::Literal(format!("}}\n{HERMES_CLOSE}")),
            ]),
            Self::LlamaJson => Guide::new(vec![
                Segment::Literal("{\"name\": \"".into()),
                names("\""),
                Segment::Literal(", \"parameters\": ".into()),
                args(),
                Segment::Literal("}".into()),
            ]),
            Self::Mistral => Guide::new(vec![
                Segment::Literal("[{\"name\": \"".into()),
                names("\""),
                Segment::Literal(", \"arguments\": ".into()),
                args(),
                Segment::Literal("}]".into()),
            ]),
        }
    }
}

/// Call ids for one answer: `call_<random>_<n>`.
pub struct CallIds {
    prefix: String,
    n: usize,
}

impl CallIds {
    pub fn new() -> Self {
        use rand::Rng;
        let prefix: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(16)
            .map(char::from)
            .collect();
        Self { prefix, n: 0 }
    }

    fn next(&mut self) -> String {
        self.n += 1;
        format!("call_{}_{}", self.prefix, self.n)
    }
}

impl Default for CallIds {
    fn default() -> Self {
        Self::new()
    }
}

/// `{"name": …, "arguments" | "parameters": …}` → (name, arguments as JSON text).
fn call_of(v: &Value) -> Option<(String, String)> {
    let name = v["name"].as_str()?.to_string();
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        // Some models write the arguments as a JSON string.
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some((name, args))
}

type Parsed = Option<(String, Vec<(String, String)>)>;

fn parse_hermes(text: &str) -> Parsed {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(HERMES_OPEN) {
        content.push_str(&rest[..start]);
        let body_start = start + HERMES_OPEN.len();
        let (body, after) = match rest[body_start..].find(HERMES_CLOSE) {
            Some(end) => (
                &rest[body_start..body_start + end],
                &rest[body_start + end + HERMES_CLOSE.len()..],
            ),
            // The answer ended inside the last call (EOS before the tag).
            None => (&rest[body_start..], ""),
        };
        let v: Value = serde_json::from_str(body.trim()).ok()?;
        calls.push(call_of(&v)?);
        rest = after;
    }
    content.push_str(rest);
    Some((content.trim().to_string(), calls))
}

fn parse_llama(text: &str) -> Parsed {
    let t = text.trim();
    let t = t.strip_prefix(PYTHON_TAG).unwrap_or(t).trim();
    if !t.starts_with('{') {
        return None;
    }
    // One call, or several separated by `;`.
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        return Some((String::new(), vec![call_of(&v)?]));
    }
    let calls = t
        .split(';')
        .map(|part| {
            serde_json::from_str::<Value>(part.trim())
                .ok()
                .and_then(|v| call_of(&v))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((String::new(), calls))
}

fn parse_mistral(text: &str) -> Parsed {
    let t = text.trim();
    let (content, json) = match t.find(MISTRAL_TAG) {
        Some(at) => (t[..at].trim(), t[at + MISTRAL_TAG.len()..].trim()),
        // The tag is a special token, which decoding drops.
        None if t.starts_with("[{") => ("", t),
        None => return None,
    };
    let v: Value = serde_json::from_str(json).ok()?;
    let calls = match &v {
        Value::Array(items) => items.iter().map(call_of).collect::<Option<Vec<_>>>()?,
        Value::Object(_) => vec![call_of(&v)?],
        _ => return None,
    };
    Some((content.to_string(), calls))
}

/// Streams an answer that may hold tool calls: text is passed on until it
/// could be the start of a call; from there on it is held and read at the
/// end.
pub struct ToolStream {
    format: ToolFormat,
    /// Text not passed on yet.
    held: String,
    /// A call may have started: hold everything that follows.
    holding: bool,
    /// Text has been passed on (Llama and Mistral calls are whole answers).
    passed: bool,
}

impl ToolStream {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            held: String::new(),
            holding: false,
            passed: false,
        }
    }

    /// Takes generated text; returns what can be shown now.
    pub fn push(&mut self, text: &str) -> String {
        self.held.push_str(text);
        if self.holding {
            return String::new();
        }
        match self.format {
            ToolFormat::Hermes => {
                if let Some(at) = self.held.find(HERMES_OPEN) {
                    self.holding = true;
                    let out: String = self.held.drain(..at).collect();
                    return out;
                }
                // Keep back a tail that could grow into `<tool_call>`.
                let keep = (1..HERMES_OPEN.len())
                    .rev()
                    .find(|n| {
                        self.held.len() >= *n
                            && self.held.is_char_boundary(self.held.len() - n)
                            && HERMES_OPEN.starts_with(&self.held[self.held.len() - n..])
                    })
                    .unwrap_or(0);
                let cut = self.held.len() - keep;
                self.held.drain(..cut).collect()
            }
            ToolFormat::LlamaJson | ToolFormat::Mistral => {
                if self.passed {
                    return std::mem::take(&mut self.held);
                }
                let t = self.held.trim_start();
                if t.is_empty() {
                    return String::new();
                }
                let starts = match self.format {
                    ToolFormat::LlamaJson => ["{", PYTHON_TAG],
                    _ => ["[", MISTRAL_TAG],
                };
                if starts.iter().any(|s| t.starts_with(s) || s.starts_with(t)) {
                    self.holding = true;
                    return String::new();
                }
                self.passed = true;
                std::mem::take(&mut self.held)
            }
        }
    }

    /// At the end: the text still to show and the calls made.
    pub fn finish(self, tools: &[String], ids: &mut CallIds) -> (String, Vec<ToolCall>) {
        if self.held.is_empty() {
            return (String::new(), Vec::new());
        }
        self.format.parse(&self.held, tools, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec![
            "get_current_temperature".to_string(),
            "get_time".to_string(),
        ]
    }

    #[test]
    fn formats_are_read_from_real_templates() {
        let corpus: Vec<Value> = serde_json::from_str(include_str!(
            "../../../../tests/data/chat_templates/corpus.json"
        ))
        .expect("corpus");
        let format = |model: &str| {
            let t = corpus
                .iter()
                .find(|t| t["model"] == model)
                .unwrap_or_else(|| panic!("{model} in the corpus"));
            ToolFormat::of_template(t["template"].as_str().expect("template"))
        };
        assert_eq!(format("Qwen/Qwen2.5-7B-Instruct"), Some(ToolFormat::Hermes));
        assert_eq!(format("Qwen/Qwen3-0.6B"), Some(ToolFormat::Hermes));
        assert_eq!(format("HuggingFaceTB/SmolLM3-3B"), Some(ToolFormat::Hermes));
        assert_eq!(
            format("meta-llama/Llama-3.1-8B-Instruct"),
            Some(ToolFormat::LlamaJson)
        );
        assert_eq!(
            format("meta-llama/Llama-3.2-11B-Vision-Instruct"),
            Some(ToolFormat::LlamaJson)
        );
        assert_eq!(
            format("mistralai/Mistral-7B-Instruct-v0.3"),
            Some(ToolFormat::Mistral)
        );
        assert_eq!(
            format("mistralai/Mistral-Nemo-Instruct-2407"),
            Some(ToolFormat::Mistral)
        );
        assert_eq!(format("CohereForAI/c4ai-command-r-v01"), None);
        assert_eq!(format("meta-llama/Llama-2-7b-chat-hf"), None);
    }

    /// Answers as the model cards and vendors' docs show them.
    #[test]
    fn calls_are_read_from_each_format() {
        let mut ids = CallIds::new();
        // Qwen's function-calling guide (qwen.readthedocs.io, "Function Calling", Hermes-style).
        let qwen = "<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": {\"location\": \"San Francisco, CA, USA\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let (text, calls) = ToolFormat::Hermes.parse(qwen, &names(), &mut ids);
        assert_eq!(text, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_current_temperature");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].arguments).expect("json"),
            serde_json::json!({"location": "San Francisco, CA, USA"})
        );
        assert_ne!(calls[0].id, calls[1].id);
        // Text before a call is kept.
        let (text, calls) = ToolFormat::Hermes.parse(
            "Let me check.\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}",
            &names(),
            &mut ids,
        );
        assert_eq!(
            (text.as_str(), calls.len()),
            ("Let me check.", 1),
            "an unclosed last call still counts"
        );

        // Llama 3.1's model card (JSON-based tool calling).
        let llama = "{\"name\": \"get_current_temperature\", \"parameters\": {\"location\": \"Paris, France\"}}";
        let (text, calls) = ToolFormat::LlamaJson.parse(llama, &names(), &mut ids);
        assert_eq!((text.as_str(), calls.len()), ("", 1));
        assert_eq!(calls[0].arguments, "{\"location\":\"Paris, France\"}");
        let (_, calls) = ToolFormat::LlamaJson.parse(
            "<|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}; {\"name\": \"get_time\", \"parameters\": {\"tz\": \"CET\"}}",
            &names(),
            &mut ids,
        );
        assert_eq!(calls.len(), 2);

        // Mistral's function calling docs (mistral-inference): the tag is a
        // special token, so decoded text may start at the array.
        for text in [
            "[TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}]",
            " [{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}]",
        ] {
            let (_, calls) = ToolFormat::Mistral.parse(text, &names(), &mut ids);
            assert_eq!(calls.len(), 1, "{text}");
        }
    }

    #[test]
    fn answers_that_are_not_calls_stay_text() {
        let mut ids = CallIds::new();
        for (format, text) in [
            (ToolFormat::Hermes, "The weather is fine."),
            (ToolFormat::Hermes, "<tool_call>\n{not json}\n</tool_call>"),
            (
                ToolFormat::Hermes,
                "<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n</tool_call>",
            ),
            (ToolFormat::LlamaJson, "{\"answer\": 42}"),
            (ToolFormat::LlamaJson, "It is 42."),
            (ToolFormat::Mistral, "[1, 2]"),
        ] {
            let (out, calls) = format.parse(text, &names(), &mut ids);
            assert!(calls.is_empty(), "{text}");
            assert_eq!(out, text, "kept as written");
        }
    }

    #[test]
    fn streams_pass_text_and_hold_calls() {
        let mut ids = CallIds::new();
        let mut s = ToolStream::new(ToolFormat::Hermes);
        let mut shown = String::new();
        for piece in [
            "Let me ",
            "check.<tool",
            "_call>\n{\"name\": \"get_time\",",
            " \"arguments\": {}}\n</tool_call>",
        ] {
            shown.push_str(&s.push(piece));
        }
        assert_eq!(shown, "Let me check.");
        let (rest, calls) = s.finish(&names(), &mut ids);
        assert_eq!((rest.as_str(), calls.len()), ("", 1));

        let mut s = ToolStream::new(ToolFormat::Hermes);
        assert_eq!(s.push("a <"), "a ", "a possible tag start is held");
        assert_eq!(s.push("b"), "<b");

        let mut s = ToolStream::new(ToolFormat::LlamaJson);
        assert_eq!(s.push("  "), "");
        assert_eq!(s.push("{\"name\""), "");
        let (_, calls) = {
            s.push(": \"get_time\", \"parameters\": {}}");
            s.finish(&names(), &mut ids)
        };
        assert_eq!(calls.len(), 1);
        let mut s = ToolStream::new(ToolFormat::LlamaJson);
        assert_eq!(s.push(" It"), " It");
        assert_eq!(s.push(" is {"), " is {", "text once it is text");
    }

    #[test]
    fn a_required_call_is_written_in_the_models_format() {
        for (format, call) in [
            (
                ToolFormat::Hermes,
                "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call>",
            ),
            (
                ToolFormat::LlamaJson,
                "{\"name\": \"get_time\", \"parameters\": {\"tz\": \"UTC\"}}",
            ),
            (
                ToolFormat::Mistral,
                "[{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}]",
            ),
        ] {
            let g = format.required_call(&names());
            assert!(g.after(call).is_some_and(|g| g.is_complete()), "{call}");
            let (_, calls) = format.parse(call, &names(), &mut CallIds::new());
            assert_eq!(calls.len(), 1, "what the guide writes reads back: {call}");
        }
    }
}
