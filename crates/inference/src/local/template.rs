//! Chat templates from `tokenizer_config.json`, rendered with minijinja.

use serde::Serialize;

use crate::error::InferenceError;
use crate::types::{Message, Role};

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'a str,
    content: &'a str,
}

/// Renders `messages` with the model's chat template, or — without one —
/// the plain concatenation of the messages (system first, one per line).
pub fn render(
    template: Option<&str>,
    messages: &[Message],
    bos: &str,
    eos: &str,
) -> Result<String, InferenceError> {
    let msgs: Vec<TemplateMessage> = messages
        .iter()
        .map(|m| TemplateMessage {
            role: match m.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
            },
            content: &m.content,
        })
        .collect();
    let Some(template) = template else {
        return Ok(msgs
            .iter()
            .map(|m| m.content)
            .collect::<Vec<_>>()
            .join("\n"));
    };
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template).map_err(|e| {
        InferenceError::NotConfigured(format!("the model's chat template does not parse: {e}"))
    })?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| InferenceError::NotConfigured(format!("chat template: {e}")))?;
    tmpl.render(minijinja::context! {
        messages => msgs,
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
    })
    .map_err(|e| InferenceError::BadRequest(format!("the chat template refused the messages: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_template_and_falls_back_without_one() {
        let t = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let out = render(
            Some(t),
            &[Message::system("S"), Message::user("Hi {{x}}")],
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(out, "<s><|system|>S</s><|user|>Hi {{x}}</s><|assistant|>");
        assert_eq!(
            render(None, &[Message::user("a"), Message::user("b")], "", "").unwrap(),
            "a\nb"
        );
        let bad = "{{ raise_exception('no system messages') }}";
        assert!(matches!(
            render(Some(bad), &[Message::user("a")], "", ""),
            Err(InferenceError::BadRequest(_))
        ));
    }
}
