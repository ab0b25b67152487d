//! Constrained decoding: a character-level automaton that says which
//! continuations keep the answer on a required shape (a JSON object, or a
//! tool call in the model's own format), so that only tokens whose text is
//! such a continuation can be chosen.
//!
//! A [`Guide`] is a sequence of segments: literal text the model must
//! write, one of a set of strings (a tool's name), and a JSON value (an
//! object at the top). It checks syntax, not a JSON Schema: answers that
//! must follow a schema are validated after generation (see
//! `ResponseFormat::check`).

/// Most whitespace characters in a row outside strings (models left free
/// can pad JSON with whitespace until `max_tokens`).
const MAX_WHITESPACE_RUN: usize = 48;

/// Where the JSON automaton stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Json {
    /// Before a value (`top` says whether it is the top-level one, which
    /// must be an object).
    Value {
        top: bool,
    },
    /// Inside a string; `key` if it is an object key.
    Str {
        key: bool,
        escape: Escape,
    },
    Number(NumberPhase),
    /// Rest of `true`, `false` or `null`.
    Literal(&'static str),
    /// After `{`: a key or `}`.
    KeyOrClose,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After `[`: a value or `]`.
    ValueOrClose,
    /// After a value inside a container: `,` or its closing bracket.
    After,
    /// The top-level value is complete.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After a backslash.
    Start,
    /// Inside `\uXXXX`: hex digits still to come.
    Hex(u8),
}

/// JSON's number grammar: `-? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumberPhase {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl NumberPhase {
    fn complete(self) -> bool {
        matches!(
            self,
            NumberPhase::Zero | NumberPhase::Int | NumberPhase::Frac | NumberPhase::Exp
        )
    }

    fn next(self, c: char) -> Option<NumberPhase> {
        use NumberPhase::*;
        let digit = c.is_ascii_digit();
        match (self, c) {
            (Minus, '0') => Some(Zero),
            (Minus, _) if digit => Some(Int),
            (Int, _) if digit => Some(Int),
            (Zero | Int, '.') => Some(Dot),
            (Dot | Frac, _) if digit => Some(Frac),
            (Zero | Int | Frac, 'e' | 'E') => Some(E),
            (E, '+' | '-') => Some(ESign),
            (E | ESign | Exp, _) if digit => Some(Exp),
            _ => None,
        }
    }
}

/// A JSON value being written, character by character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonMachine {
    state: Json,
    /// Open containers: `true` for an object, `false` for an array.
    stack: Vec<bool>,
    whitespace: usize,
    object_only: bool,
}

impl JsonMachine {
    /// A machine for one JSON value; `object_only` requires an object at
    /// the top (JSON mode).
    pub fn new(object_only: bool) -> Self {
        Self {
            state: Json::Value { top: true },
            stack: Vec::new(),
            whitespace: 0,
            object_only,
        }
    }

    pub fn is_complete(&self) -> bool {
        self.state == Json::Done
    }

    /// The state after a value ends.
    fn value_done(&mut self) {
        self.state = if self.stack.is_empty() {
            Json::Done
        } else {
            Json::After
        };
    }

    fn open(&mut self, object: bool) {
        self.stack.push(object);
        self.state = if object {
            Json::KeyOrClose
        } else {
            Json::ValueOrClose
        };
    }

    fn close(&mut self, c: char) -> bool {
        match (self.stack.last(), c) {
            (Some(true), '}') | (Some(false), ']') => {
                self.stack.pop();
                self.value_done();
                true
            }
            _ => false,
        }
    }

    /// Starts a value with `c`.
    fn begin_value(&mut self, c: char, top: bool) -> bool {
        if top && self.object_only && c != '{' {
            return false;
        }
        match c {
            '{' => self.open(true),
            '[' => self.open(false),
            '"' => {
                self.state = Json::Str {
                    key: false,
                    escape: Escape::None,
                }
            }
            '-' => self.state = Json::Number(NumberPhase::Minus),
            '0' => self.state = Json::Number(NumberPhase::Zero),
            '1'..='9' => self.state = Json::Number(NumberPhase::Int),
            't' => self.state = Json::Literal("rue"),
            'f' => self.state = Json::Literal("alse"),
            'n' => self.state = Json::Literal("ull"),
            _ => return false,
        }
        true
    }

    /// Feeds one character; `false` (and the machine unchanged in meaning
    /// only if the caller discards it) when it cannot come next.
    pub fn push(&mut self, c: char) -> bool {
        let ws = matches!(c, ' ' | '\t' | '\n' | '\r');
        let in_string = matches!(self.state, Json::Str { .. });
        if ws && !in_string && !matches!(self.state, Json::Number(_) | Json::Literal(_)) {
            if self.state == Json::Done {
                return false;
            }
            self.whitespace += 1;
            return self.whitespace <= MAX_WHITESPACE_RUN;
        }
        if !in_string {
            self.whitespace = 0;
        }
        match self.state.clone() {
            Json::Done => false,
            Json::Value { top } => self.begin_value(c, top),
            Json::ValueOrClose => {
                if c == ']' {
                    self.close(c)
                } else {
                    self.begin_value(c, false)
                }
            }
            Json::KeyOrClose | Json::Key => {
                if c == '}' && self.state == Json::KeyOrClose {
                    return self.close(c);
                }
                if c == '"' {
                    self.state = Json::Str {
                        key: true,
                        escape: Escape::None,
                    };
                    true
                } else {
                    false
                }
            }
            Json::Colon => {
                if c == ':' {
                    self.state = Json::Value { top: false };
                    true
                } else {
                    false
                }
            }
            Json::After => match c {
                ',' => {
                    self.state = if self.stack.last() == Some(&true) {
                        Json::Key
                    } else {
                        Json::Value { top: false }
                    };
                    true
                }
                '}' | ']' => self.close(c),
                _ => false,
            },
            Json::Literal(rest) => {
                let mut chars = rest.chars();
                if chars.next() != Some(c) {
                    return false;
                }
                let rest = chars.as_str();
                if rest.is_empty() {
                    self.value_done();
                } else {
                    self.state = Json::Literal(rest);
                }
                true
            }
            Json::Number(phase) => match phase.next(c) {
                Some(next) => {
                    self.state = Json::Number(next);
                    true
                }
                None if phase.complete() => {
                    // The number ended: `c` belongs to what follows it.
                    self.value_done();
                    self.push(c)
                }
                None => false,
            },
            Json::Str { key, escape } => {
                let next_escape = match escape {
                    Escape::None => match c {
                        '"' => {
                            if key {
                                self.state = Json::Colon;
                            } else {
                                self.value_done();
                            }
                            return true;
                        }
                        '\\' => Escape::Start,
                        c if (c as u32) < 0x20 => return false,
                        _ => Escape::None,
                    },
                    Escape::Start => match c {
                        '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' => Escape::None,
                        'u' => Escape::Hex(4),
                        _ => return false,
                    },
                    Escape::Hex(n) => {
                        if !c.is_ascii_hexdigit() {
                            return false;
                        }
                        if n == 1 {
                            Escape::None
                        } else {
                            Escape::Hex(n - 1)
                        }
                    }
                };
                self.state = Json::Str {
                    key,
                    escape: next_escape,
                };
                true
            }
        }
    }
}

/// One part of a guided answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Exactly this text.
    Literal(String),
    /// One of these strings (none a prefix of another).
    OneOf(Vec<String>),
    /// A JSON value (an object at the top when `object_only`).
    Json(JsonMachine),
}

/// The shape an answer must take, and how much of it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guide {
    segments: Vec<Segment>,
    /// The segment being written.
    at: usize,
    /// Characters written in the current segment (literals and choices).
    typed: String,
}

impl Guide {
    pub fn new(segments: Vec<Segment>) -> Self {
        let mut g = Self {
            segments,
            at: 0,
            typed: String::new(),
        };
        g.skip_empty();
        g
    }

    /// Any JSON object (OpenAI's JSON mode and `json_schema`).
    pub fn json_object() -> Self {
        Self::new(vec![Segment::Json(JsonMachine::new(true))])
    }

    fn skip_empty(&mut self) {
        while let Some(Segment::Literal(l)) = self.segments.get(self.at) {
            if !l.is_empty() {
                break;
            }
            self.at += 1;
        }
    }

    /// Whether the whole shape has been written.
    pub fn is_complete(&self) -> bool {
        self.at >= self.segments.len()
    }

    /// Feeds one character; `false` if it cannot come next (the guide is
    /// then in an unspecified state: feed a clone to try).
    pub fn push(&mut self, c: char) -> bool {
        let Some(segment) = self.segments.get_mut(self.at) else {
            return false;
        };
        match segment {
            Segment::Literal(text) => {
                self.typed.push(c);
                if !text.starts_with(self.typed.as_str()) {
                    return false;
                }
                if self.typed.len() == text.len() {
                    self.typed.clear();
                    self.at += 1;
                    self.skip_empty();
                }
                true
            }
            Segment::OneOf(options) => {
                self.typed.push(c);
                let typed = self.typed.as_str();
                if !options.iter().any(|o| o.starts_with(typed)) {
                    return false;
                }
                if options.iter().any(|o| o == typed) {
                    self.typed.clear();
                    self.at += 1;
                    self.skip_empty();
                }
                true
            }
            Segment::Json(machine) => {
                if !machine.push(c) {
                    return false;
                }
                if machine.is_complete() {
                    self.at += 1;
                    self.skip_empty();
                }
                true
            }
        }
    }

    /// The guide after `text`, or `None` if `text` leaves the shape.
    pub fn after(&self, text: &str) -> Option<Guide> {
        if text.is_empty() {
            return None;
        }
        let mut g = self.clone();
        for c in text.chars() {
            if !g.push(c) {
                return None;
            }
        }
        Some(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(g: &Guide, text: &str) -> bool {
        g.after(text).is_some()
    }

    fn complete(g: &Guide, text: &str) -> bool {
        g.after(text).is_some_and(|g| g.is_complete())
    }

    #[test]
    fn json_objects_are_accepted_whole_and_in_any_split() {
        let g = Guide::json_object();
        for doc in [
            r#"{}"#,
            r#"{"a": 1}"#,
            r#" {"a": [1, -2.5e+3, 0, true, false, null, "x\"\\\u00e9"], "b": {"c": {}}}"#,
            "{\n  \"k\": \"v\"\n}",
            r#"{"n": 0.5, "m": -0, "e": 1E9}"#,
        ] {
            assert!(complete(&g, doc), "{doc}");
            assert!(
                serde_json::from_str::<serde_json::Value>(doc).is_ok(),
                "the test documents are JSON"
            );
            // Character by character, as tokens of one character would.
            let mut step = g.clone();
            for c in doc.chars() {
                step = step.after(&c.to_string()).expect(doc);
            }
            assert!(step.is_complete());
        }
    }

    #[test]
    fn what_json_forbids_is_refused() {
        let g = Guide::json_object();
        for bad in [
            "[1]",
            "\"text\"",
            "1",
            "{'a': 1}",
            "{\"a\" 1}",
            "{\"a\": 01}",
            "{\"a\": 1,}",
            "{\"a\": tru}x",
            "{\"a\": \"\\x\"}",
            "{\"a\": \"line\nbreak\"}",
            "{\"a\": 1}}",
            "{\"a\": 1} trailing",
            "{\"a\": [1}",
            "{\"a\": 1.}",
            "{\"a\": -}",
        ] {
            assert!(!complete(&g, bad), "{bad:?} must not complete");
        }
        assert!(accepts(&g, "{\"a\": tr"), "a prefix is fine");
        assert!(!accepts(&g, ""), "a token must write something");
        let spaces = " ".repeat(MAX_WHITESPACE_RUN + 1);
        assert!(!accepts(&g, &format!("{{{spaces}")), "endless whitespace");
        assert!(
            accepts(&g, &format!("{{\"a\": \"{spaces}{spaces}")),
            "spaces inside strings are text"
        );
    }

    #[test]
    fn a_tool_call_shape_takes_only_the_offered_names() {
        let g = Guide::new(vec![
            Segment::Literal("<tool_call>\n{\"name\": \"".into()),
            Segment::OneOf(vec!["get_weather\"".into(), "get_time\"".into()]),
            Segment::Literal(", \"arguments\": ".into()),
            Segment::Json(JsonMachine::new(true)),
            Segment::Literal("}\n</tool_call>".into()),
        ]);
        let call =
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call>";
        assert!(complete(&g, call));
        assert!(!accepts(&g, "<tool_call>\n{\"name\": \"get_x"));
        assert!(accepts(&g, "<tool_call>\n{\"name\": \"get_"));
        assert!(!accepts(&g, "Sure! <tool_call>"));
        assert!(!complete(
            &g,
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}"
        ));
    }
}
