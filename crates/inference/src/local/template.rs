//! Chat templates rendered the way Hugging Face `transformers` renders them
//! (`apply_chat_template`): jinja2's sandbox with `trim_blocks` and
//! `lstrip_blocks`, Python's string/dict/list methods, loop controls, and
//! transformers' own globals and filters — `raise_exception`,
//! `strftime_now`, and a `tojson` that is Python's `json.dumps` (no HTML
//! escaping, `indent`, `separators`, `sort_keys`, `ensure_ascii`). Every
//! named special token of the tokenizer (`bos_token`, `eos_token`, …) is a
//! variable, as are `messages`, `tools`, `documents` and
//! `add_generation_prompt`.
//!
//! Where the templates of an export live ([`ChatTemplates::from_dir`]):
//! `chat_template.jinja` (newer exports) and `additional_chat_templates/*.jinja`,
//! then `chat_template.json`, then `tokenizer_config.json`'s `chat_template`
//! (a string, or a list of `{name, template}`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use chrono::format::{Item, StrftimeItems};
use minijinja::value::{Kwargs, Rest, Value as JValue, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde_json::Value;

/// Why a chat could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template itself refused the conversation (`raise_exception`):
    /// the caller's to fix.
    #[error("{0}")]
    Refused(String),
    /// The template is broken (does not parse, or fails on its own): the
    /// model's files are at fault, not the caller.
    #[error("{0}")]
    Broken(String),
}

/// The chat templates of one model: an unnamed default, or several named
/// ones (`default`, `tool_use`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatTemplates {
    pub templates: BTreeMap<String, String>,
}

use super::read_json;

/// A special token as `tokenizer_config.json` / `special_tokens_map.json`
/// write it: a string or `{"content": …}`.
pub fn token_string(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::to_string)
        .or_else(|| v["content"].as_str().map(str::to_string))
}

impl ChatTemplates {
    /// From the value of a `chat_template` key: a string, or a list of
    /// `{name, template}`.
    pub fn from_config_value(v: &Value) -> Self {
        let mut templates = BTreeMap::new();
        match v {
            Value::String(s) => {
                templates.insert("default".to_string(), s.clone());
            }
            Value::Array(items) => {
                for item in items {
                    if let (Some(name), Some(t)) =
                        (item["name"].as_str(), item["template"].as_str())
                    {
                        templates.insert(name.to_string(), t.to_string());
                    }
                }
            }
            _ => {}
        }
        Self { templates }
    }

    /// The templates of an export directory, in transformers' order of
    /// precedence: separate `.jinja` files first, then `chat_template.json`,
    /// then `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Self {
        let mut templates = BTreeMap::new();
        if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
            templates.insert("default".to_string(), t);
        }
        if let Ok(entries) = std::fs::read_dir(dir.join("additional_chat_templates")) {
            for e in entries.flatten() {
                let path = e.path();
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".jinja"))
                    .map(str::to_string);
                if let (Some(name), Ok(t)) = (name, std::fs::read_to_string(&path)) {
                    templates.insert(name, t);
                }
            }
        }
        if !templates.is_empty() {
            return Self { templates };
        }
        let from_json =
            Self::from_config_value(&read_json(&dir.join("chat_template.json"))["chat_template"]);
        if !from_json.is_empty() {
            return from_json;
        }
        Self::from_config_value(&read_json(&dir.join("tokenizer_config.json"))["chat_template"])
    }

    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// The template to use, as transformers picks it: `tool_use` when tools
    /// are given and there is one, else `default`, else the only one.
    pub fn pick(&self, with_tools: bool) -> Option<&str> {
        if with_tools {
            if let Some(t) = self.templates.get("tool_use") {
                return Some(t);
            }
        }
        self.templates
            .get("default")
            .or_else(|| {
                (self.templates.len() == 1)
                    .then(|| self.templates.values().next())
                    .flatten()
            })
            .map(String::as_str)
    }
}

/// The named special tokens of a tokenizer, as template variables
/// (`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`,
/// `cls_token`, `mask_token`, and any named `extra_special_tokens`).
pub fn special_tokens(dir: &Path) -> BTreeMap<String, String> {
    const NAMED: [&str; 7] = [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ];
    let tcfg = read_json(&dir.join("tokenizer_config.json"));
    let mut out = BTreeMap::new();
    for name in NAMED {
        if let Some(t) = token_string(&tcfg[name]) {
            out.insert(name.to_string(), t);
        }
    }
    if let Value::Object(extra) = &tcfg["extra_special_tokens"] {
        for (name, v) in extra {
            if let Some(t) = token_string(v) {
                out.insert(name.clone(), t);
            }
        }
    }
    // transformers reads special_tokens_map.json only for tokenizers saved
    // without `added_tokens_decoder` (older exports); its values then win.
    if tcfg.get("added_tokens_decoder").is_none() {
        let map = read_json(&dir.join("special_tokens_map.json"));
        for name in NAMED {
            if let Some(t) = token_string(&map[name]) {
                out.insert(name.to_string(), t);
            }
        }
    }
    out
}

/// What one render sees.
#[derive(Debug, Clone, Default)]
pub struct ChatInput {
    /// OpenAI-style message objects (`role`, `content`, and whatever else
    /// the caller sent: `tool_calls`, `name`, `tool_call_id`, …). Keys
    /// whose value is `null` are dropped, as transformers does.
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    pub documents: Option<Value>,
    pub add_generation_prompt: bool,
    /// Extra variables (`enable_thinking`, `date_string`, …).
    pub extra: serde_json::Map<String, Value>,
}

type Clock = Arc<dyn Fn() -> chrono::NaiveDateTime + Send + Sync>;

/// A compiled chat template with its special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    special: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("special", &self.special)
            .finish()
    }
}

/// The marker `raise_exception` leaves on its error, to tell a refusal
/// from a broken template.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

fn error_chain_has_raised(e: &minijinja::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<Raised>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn describe(e: &minijinja::Error) -> String {
    let mut msg = e
        .detail()
        .map(str::to_string)
        .unwrap_or_else(|| e.kind().to_string());
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (line {line})"));
    }
    msg
}

impl ChatTemplate {
    /// Compiles `source` (the local clock serves `strftime_now`).
    pub fn new(source: &str, special: BTreeMap<String, String>) -> Result<Self, TemplateError> {
        Self::with_clock(
            source,
            special,
            Arc::new(|| chrono::Local::now().naive_local()),
        )
    }

    /// Compiles `source` with a given clock for `strftime_now` (tests).
    pub fn with_clock(
        source: &str,
        special: BTreeMap<String, String>,
        clock: Clock,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<JValue, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg).with_source(Raised))
            },
        );
        env.add_function(
            "strftime_now",
            move |format: String| -> Result<String, minijinja::Error> {
                let items: Vec<Item> = StrftimeItems::new(&format).collect();
                if items.iter().any(|i| matches!(i, Item::Error)) {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("strftime_now: bad format {format:?}"),
                    ));
                }
                Ok(clock().format_with_items(items.into_iter()).to_string())
            },
        );
        env.add_filter("tojson", tojson);
        // Printing a value is Python's `str()`: dicts and lists as their
        // repr (`{'a': 1}`), `True`, `None`.
        env.set_formatter(|out, _state, value| {
            if value.is_undefined() {
                return Ok(());
            }
            match value.as_str() {
                Some(s) if value.kind() == ValueKind::String => out.write_str(s),
                _ => out.write_str(&py_str(value)),
            }
            .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
        });
        env.add_filter("string", |v: JValue| py_str(&v));
        env.add_template_owned("chat", rewrite_generation_blocks(source))
            .map_err(|e| {
                TemplateError::Broken(format!(
                    "the chat template does not parse: {}",
                    describe(&e)
                ))
            })?;
        Ok(Self { env, special })
    }

    /// Renders a conversation.
    pub fn render(&self, input: &ChatInput) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError::Broken(describe(&e)))?;
        let mut ctx: BTreeMap<String, JValue> = BTreeMap::new();
        for (k, v) in &self.special {
            ctx.insert(k.clone(), JValue::from(v.clone()));
        }
        for (k, v) in &input.extra {
            ctx.insert(k.clone(), JValue::from_serialize(v));
        }
        let messages: Vec<Value> = input
            .messages
            .iter()
            .map(|m| match m {
                Value::Object(o) => Value::Object(
                    o.iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
                other => other.clone(),
            })
            .collect();
        ctx.insert("messages".into(), JValue::from_serialize(&messages));
        ctx.insert(
            "tools".into(),
            input
                .tools
                .as_ref()
                .map_or(JValue::from(()), JValue::from_serialize),
        );
        ctx.insert(
            "documents".into(),
            input
                .documents
                .as_ref()
                .map_or(JValue::from(()), JValue::from_serialize),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            JValue::from(input.add_generation_prompt),
        );
        tmpl.render(JValue::from_serialize(&ctx)).map_err(|e| {
            if error_chain_has_raised(&e) {
                TemplateError::Refused(
                    e.detail()
                        .unwrap_or("the chat template refused the conversation")
                        .to_string(),
                )
            } else {
                TemplateError::Broken(format!("the chat template failed: {}", describe(&e)))
            }
        })
    }
}

/// transformers' `{% generation %}…{% endgeneration %}` (it marks the
/// assistant's tokens for training masks and renders its body unchanged)
/// becomes an always-true `if` block, which keeps its whitespace control.
fn rewrite_generation_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = inner.strip_prefix('-').map_or(("", inner), |b| ("-", b));
        let (body, trail) = body.strip_suffix('-').map_or((body, ""), |b| (b, "-"));
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, positional or by keyword.
fn tojson(value: &JValue, args: Rest<JValue>, kwargs: Kwargs) -> Result<String, minijinja::Error> {
    let mut ensure_ascii = args.first().is_some_and(JValue::is_true);
    let mut indent: Option<JValue> = args.get(1).cloned();
    let mut separators: Option<JValue> = args.get(2).cloned();
    let mut sort_keys = args.get(3).is_some_and(JValue::is_true);
    if let Some(v) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        ensure_ascii = v;
    }
    if let Some(v) = kwargs.get::<Option<JValue>>("indent")? {
        indent = Some(v);
    }
    if let Some(v) = kwargs.get::<Option<JValue>>("separators")? {
        separators = Some(v);
    }
    if let Some(v) = kwargs.get::<Option<bool>>("sort_keys")? {
        sort_keys = v;
    }
    kwargs.assert_all_used()?;
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => {
                Some(" ".repeat(i64::try_from(v.clone()).unwrap_or(0).max(0) as usize))
            }
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => None,
        },
    };
    let (item_sep, key_sep) = match separators.filter(|s| !s.is_none() && !s.is_undefined()) {
        Some(s) => {
            let parts: Vec<String> = s
                .try_iter()?
                .map(|p| p.as_str().unwrap_or_default().to_string())
                .collect();
            match parts.as_slice() {
                [a, b] => (a.clone(), b.clone()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair",
                    ))
                }
            }
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    opts.write(value, 0, &mut out)?;
    Ok(out)
}

/// Python's `json.dumps` over minijinja values.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, v: &JValue, level: usize, out: &mut String) -> Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                    out.push_str(&py_float(f));
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<JValue> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<JValue> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    let key = match k.as_str() {
                        Some(s) => s.to_string(),
                        None if k.is_none() => "null".to_string(),
                        None => k.to_string(),
                    };
                    self.string(&key, out);
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            _ => self.string(&v.to_string(), out),
        }
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && (c as u32) > 0x7e => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `str()` of a template value.
fn py_str(v: &JValue) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        _ => {
            let mut out = String::new();
            py_repr(v, &mut out);
            out
        }
    }
}

/// Python's `repr()` of a template value.
fn py_repr(v: &JValue, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => out.push_str(&py_float(f64::try_from(v.clone()).unwrap_or(f64::NAN))),
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            let quote = if s.contains('\'') && !s.contains('"') {
                '"'
            } else {
                '\''
            };
            out.push(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                        out.push_str(&format!("\\x{:02x}", c as u32))
                    }
                    c => out.push(c),
                }
            }
            out.push(quote);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(items) = v.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = v.try_iter() {
                for (i, k) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&k, out);
                    out.push_str(": ");
                    py_repr(&v.get_item(&k).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
}

/// Python's `repr(float)`: shortest round-trip digits, `1.0` not `1`,
/// exponents as `1e+16` / `1e-05`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let e = format!("{f:e}");
        let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f:?}");
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}

/// The plain join used for models without a chat template (one message per
/// line, in order).
pub fn plain_join(messages: &[crate::types::Message]) -> String {
    messages
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Tools as templates take them (OpenAI's `{"type": "function",
/// "function": {…}}`, as transformers passes JSON-schema tools).
pub fn tool_values(tools: &[crate::types::Tool]) -> Value {
    tools
        .iter()
        .map(|t| {
            let mut f = serde_json::json!({"name": t.name});
            if let Some(d) = &t.description {
                f["description"] = d.clone().into();
            }
            f["parameters"] = t
                .parameters
                .clone()
                .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
            serde_json::json!({"type": "function", "function": f})
        })
        .collect()
}

/// OpenAI-style message objects for a template.
pub fn message_values(messages: &[crate::types::Message]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            let role = match m.role {
                crate::types::Role::System => "system",
                crate::types::Role::User => "user",
                crate::types::Role::Assistant => "assistant",
                crate::types::Role::Tool => "tool",
            };
            let mut v = serde_json::json!({"role": role, "content": m.content});
            if let Some(id) = &m.tool_call_id {
                v["tool_call_id"] = id.clone().into();
            }
            if !m.tool_calls.is_empty() {
                v["tool_calls"] = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        // Templates take the arguments as a mapping (as
                        // transformers documents); text that is not JSON
                        // stays text.
                        let arguments = serde_json::from_str::<Value>(&c.arguments)
                            .ok()
                            .filter(Value::is_object)
                            .unwrap_or_else(|| c.arguments.clone().into());
                        serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments}})
                    })
                    .collect();
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn special() -> BTreeMap<String, String> {
        [("bos_token", "<s>"), ("eos_token", "</s>")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn chat(messages: Value, add: bool) -> ChatInput {
        ChatInput {
            messages: messages.as_array().cloned().unwrap_or_default(),
            add_generation_prompt: add,
            ..Default::default()
        }
    }

    #[test]
    fn python_methods_trim_and_lstrip_blocks() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {% if m['role'] == 'user' %}\n[{{ m['content'].strip() }}]\n  {% endif %}\n{% endfor %}\n",
            special(),
        )
        .unwrap();
        let out = t
            .render(&chat(json!([{"role": "user", "content": "  hi  "}]), false))
            .unwrap();
        assert_eq!(out, "[hi]\n");
    }

    #[test]
    fn raise_exception_is_a_refusal_and_other_failures_are_broken() {
        let t =
            ChatTemplate::new("{{ raise_exception('no system messages') }}", special()).unwrap();
        assert_eq!(
            t.render(&chat(json!([]), true)),
            Err(TemplateError::Refused("no system messages".into()))
        );
        assert!(matches!(
            ChatTemplate::new("{% if %}", special()),
            Err(TemplateError::Broken(_))
        ));
        let t = ChatTemplate::new("{{ messages[0].content.nope() }}", special()).unwrap();
        assert!(matches!(
            t.render(&chat(json!([{"role": "user", "content": "x"}]), true)),
            Err(TemplateError::Broken(_))
        ));
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let t = ChatTemplate::new(
            "{{ tools|tojson }}|{{ tools|tojson(indent=2) }}|{{ tools|tojson(sort_keys=true, separators=[',', ':']) }}",
            special(),
        )
        .unwrap();
        let out = t
            .render(&ChatInput {
                tools: Some(json!([{"b": 1.0, "a": "<é>", "c": [], "d": {}, "e": 1e-5, "f": 3}])),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            out,
            "[{\"b\": 1.0, \"a\": \"<é>\", \"c\": [], \"d\": {}, \"e\": 1e-05, \"f\": 3}]|[\n  {\n    \"b\": 1.0,\n    \"a\": \"<é>\",\n    \"c\": [],\n    \"d\": {},\n    \"e\": 1e-05,\n    \"f\": 3\n  }\n]|[{\"a\":\"<é>\",\"b\":1.0,\"c\":[],\"d\":{},\"e\":1e-05,\"f\":3}]"
        );
    }

    #[test]
    fn strftime_now_uses_the_clock_and_refuses_bad_formats() {
        let clock: Clock = Arc::new(|| {
            chrono::NaiveDate::from_ymd_opt(2024, 7, 26)
                .and_then(|d| d.and_hms_opt(1, 2, 3))
                .unwrap_or_default()
        });
        let t =
            ChatTemplate::with_clock("{{ strftime_now('%d %b %Y') }}", special(), clock.clone())
                .unwrap();
        assert_eq!(t.render(&ChatInput::default()).unwrap(), "26 Jul 2024");
        let t = ChatTemplate::with_clock("{{ strftime_now('%Q') }}", special(), clock).unwrap();
        assert!(matches!(
            t.render(&ChatInput::default()),
            Err(TemplateError::Broken(_))
        ));
    }

    #[test]
    fn named_templates_are_picked_like_transformers() {
        let t = ChatTemplates::from_config_value(&json!([
            {"name": "default", "template": "D"},
            {"name": "tool_use", "template": "T"}
        ]));
        assert_eq!(t.pick(false), Some("D"));
        assert_eq!(t.pick(true), Some("T"));
        let one = ChatTemplates::from_config_value(&json!("X"));
        assert_eq!(one.pick(true), Some("X"));
        assert_eq!(ChatTemplates::default().pick(false), None);
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let src = "{%- for m in messages %}{% generation %}[{{ m.content }}]{%- endgeneration %}{% endfor %}";
        assert_eq!(
            rewrite_generation_blocks(src),
            "{%- for m in messages %}{% if true %}[{{ m.content }}]{%- endif %}{% endfor %}"
        );
        let t = ChatTemplate::new(src, special()).unwrap();
        assert_eq!(
            t.render(&chat(json!([{"role": "assistant", "content": "a"}]), false))
                .unwrap(),
            "[a]"
        );
    }

    #[test]
    fn printed_values_are_pythons_str() {
        let t = ChatTemplate::new(
            "{{ tools[0] }}|{{ tools[1] }}|{{ tools[2] }}|{{ tools[3] }}|{{ tools|string }}",
            special(),
        )
        .unwrap();
        let out = t
            .render(&ChatInput {
                tools: Some(json!([{"a": "it's", "b": [1, 2.5, null]}, true, "x", "q\"'\n"])),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            out,
            "{'a': \"it's\", 'b': [1, 2.5, None]}|True|x|q\"'\n|[{'a': \"it's\", 'b': [1, 2.5, None]}, True, 'x', 'q\"\\'\\n']"
        );
    }

    #[test]
    fn floats_print_like_python() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.1), "0.1");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(-2.5e-7), "-2.5e-07");
        assert_eq!(py_float(123456.5), "123456.5");
    }
}
