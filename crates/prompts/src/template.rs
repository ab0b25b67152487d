//! `{variable}` templates. `{{` and `}}` are literal braces, so JSON
//! examples can live in a template. Rendering is pure: no code runs, no
//! other syntax exists.

use std::collections::BTreeSet;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// A syntax error, with the character offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template error at character {position}: {message}")]
pub struct TemplateError {
    pub position: usize,
    pub message: String,
}

/// Longest template accepted, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 100_000;

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 64
}

impl Template {
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError {
                position: 0,
                message: format!("longer than {MAX_TEMPLATE_BYTES} bytes"),
            });
        }
        let chars: Vec<char> = source.chars().collect();
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '{' if chars.get(i + 1) == Some(&'{') => {
                    text.push('{');
                    i += 2;
                }
                '}' if chars.get(i + 1) == Some(&'}') => {
                    text.push('}');
                    i += 2;
                }
                '{' => {
                    let close = chars[i + 1..]
                        .iter()
                        .position(|c| *c == '}' || *c == '{')
                        .map(|p| p + i + 1);
                    let Some(close) = close.filter(|c| chars[*c] == '}') else {
                        return Err(TemplateError {
                            position: i,
                            message: "unclosed '{' (write '{{' for a literal brace)".into(),
                        });
                    };
                    let name: String = chars[i + 1..close]
                        .iter()
                        .collect::<String>()
                        .trim()
                        .to_string();
                    if !valid_name(&name) {
                        return Err(TemplateError {
                            position: i,
                            message: format!(
                                "{{{name}}} is not a placeholder: names are letters, digits and '_' (write '{{{{' for a literal brace)"
                            ),
                        });
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Var(name));
                    i = close + 1;
                }
                '}' => {
                    return Err(TemplateError {
                        position: i,
                        message: "unmatched '}' (write '}}' for a literal brace)".into(),
                    });
                }
                c => {
                    text.push(c);
                    i += 1;
                }
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self { parts })
    }

    /// Placeholder names, each once, sorted.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Var(v) => Some(v.as_str()),
                Part::Text(_) => None,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
    }

    /// Fills the placeholders from a JSON object: strings as they are,
    /// other values as JSON. Values are inserted verbatim — braces in them
    /// are not template syntax. Errs with the first missing name.
    pub fn render(&self, variables: &Value) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(name) => match variables.get(name) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(Value::Null) | None => return Err(name.clone()),
                    Some(other) => out.push_str(&other.to_string()),
                },
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn placeholders_and_literal_braces() {
        let t = Template::parse("Hi {name}! JSON: {{\"a\": {count}}} {name}").unwrap();
        assert_eq!(t.placeholders().collect::<Vec<_>>(), ["count", "name"]);
        assert_eq!(
            t.render(&json!({"name": "Ada", "count": 3})).unwrap(),
            "Hi Ada! JSON: {\"a\": 3} Ada"
        );
        assert_eq!(
            Template::parse("{ spaced }")
                .unwrap()
                .placeholders()
                .collect::<Vec<_>>(),
            ["spaced"]
        );
    }

    #[test]
    fn syntax_errors_say_where() {
        for (src, pos) in [
            ("a {b", 2),
            ("a } b", 2),
            ("{1abc}", 0),
            ("{}", 0),
            ("{a b}", 0),
            ("{a{b}}", 0),
        ] {
            let e = Template::parse(src).unwrap_err();
            assert_eq!(e.position, pos, "{src}: {e}");
        }
    }

    #[test]
    fn hostile_values_are_inserted_verbatim() {
        let t = Template::parse("<{v}>").unwrap();
        for v in [
            "{other}",
            "}}{{",
            "ünïcødé 日本",
            "\u{0}",
            &"x".repeat(100_000),
        ] {
            assert_eq!(t.render(&json!({"v": v})).unwrap(), format!("<{v}>"));
        }
        assert_eq!(
            t.render(&json!({"v": {"k": [1, 2]}})).unwrap(),
            "<{\"k\":[1,2]}>"
        );
        assert_eq!(t.render(&json!({})).unwrap_err(), "v");
        assert_eq!(t.render(&json!({"v": null})).unwrap_err(), "v");
        assert!(Template::parse(&"a".repeat(MAX_TEMPLATE_BYTES + 1)).is_err());
    }
}
