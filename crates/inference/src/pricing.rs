//! Per-model prices → the cost of each call. An unknown model has an
//! unknown cost (`None`), never a silent zero.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::InferenceError;
use crate::types::Usage;

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
    /// The model's context window in tokens, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
}

impl Price {
    pub fn cost(&self, usage: &Usage) -> f64 {
        (f64::from(usage.prompt_tokens) * self.input_per_million
            + f64::from(usage.completion_tokens) * self.output_per_million)
            / 1_000_000.0
    }
}

/// Prices keyed by `provider/model`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
}

const BUILTIN: &str = include_str!("../prices.json");

fn parse(json: &str) -> Result<HashMap<String, Price>, String> {
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for (key, value) in raw {
        if key.starts_with('_') {
            continue;
        }
        let price: Price = serde_json::from_value(value).map_err(|e| format!("{key}: {e}"))?;
        let valid = |v: f64| v.is_finite() && v >= 0.0;
        if !valid(price.input_per_million) || !valid(price.output_per_million) {
            return Err(format!("{key}: prices must be finite and non-negative"));
        }
        if !key.contains('/') {
            return Err(format!("{key}: keys are provider/model"));
        }
        out.insert(key, price);
    }
    Ok(out)
}

impl PriceTable {
    /// The table shipped with Muse (`prices.json`).
    pub fn builtin() -> Self {
        Self {
            prices: parse(BUILTIN).unwrap_or_default(),
        }
    }

    /// The built-in table with the entries of a JSON file of the same shape
    /// layered on top (new models, or corrected prices).
    pub fn with_overrides(mut self, path: &Path) -> Result<Self, InferenceError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            InferenceError::NotConfigured(format!("price file {}: {e}", path.display()))
        })?;
        let extra = parse(&text).map_err(|e| {
            InferenceError::NotConfigured(format!("price file {}: {e}", path.display()))
        })?;
        self.prices.extend(extra);
        Ok(self)
    }

    pub fn insert(&mut self, provider: &str, model: &str, price: Price) {
        self.prices.insert(format!("{provider}/{model}"), price);
    }

    /// The price of a model. A dated snapshot (`gpt-4o-2024-08-06`,
    /// `claude-3-5-haiku-20241022`) and a `-latest` alias fall back to the
    /// base name.
    pub fn price(&self, provider: &str, model: &str) -> Option<Price> {
        if let Some(p) = self.prices.get(&format!("{provider}/{model}")) {
            return Some(*p);
        }
        // An OpenAI fine-tune (`ft:gpt-4o-mini-2024-07-18:org:name:id`) is
        // priced as fine-tunes of its base model are (`ft:gpt-4o-mini`).
        if let Some(rest) = model.strip_prefix("ft:") {
            let base = rest.split(':').next().unwrap_or(rest);
            let base = strip_date_suffix(base).unwrap_or(base);
            return self.prices.get(&format!("{provider}/ft:{base}")).copied();
        }
        let base = strip_date_suffix(model).or_else(|| model.strip_suffix("-latest"))?;
        self.prices.get(&format!("{provider}/{base}")).copied()
    }

    /// Cost in USD, or `None` when the model's price is unknown.
    pub fn cost(&self, provider: &str, model: &str, usage: &Usage) -> Option<f64> {
        self.price(provider, model).map(|p| p.cost(usage))
    }

    pub fn len(&self) -> usize {
        self.prices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }
}

fn strip_date_suffix(model: &str) -> Option<&str> {
    let (base, suffix) = model.rsplit_once('-')?;
    if suffix.len() == 8 && suffix.chars().all(|c| c.is_ascii_digit()) {
        return Some(base);
    }
    // -YYYY-MM-DD
    let parts: Vec<&str> = model.rsplitn(4, '-').collect();
    if parts.len() == 4
        && parts[0].len() == 2
        && parts[1].len() == 2
        && parts[2].len() == 4
        && parts[..3]
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_digit()))
    {
        return Some(parts[3]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_parses_and_prices_calls() {
        let t = PriceTable::builtin();
        assert!(t.len() >= 15);
        let usage = Usage {
            prompt_tokens: 1_000_000,
            completion_tokens: 500_000,
        };
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(close(t.cost("openai", "gpt-4o-mini", &usage), 0.15 + 0.3));
        assert!(close(
            t.cost("openai", "gpt-4o-2024-08-06", &usage),
            2.5 + 5.0
        ));
        assert!(close(
            t.cost("anthropic", "claude-3-haiku-20240307", &usage),
            0.25 + 0.625
        ));
        // The seeds' model names are priced, dated and -latest forms too.
        for (provider, model) in [
            ("openai", "gpt-4"),
            ("openai", "gpt-4-turbo"),
            ("openai", "gpt-3.5-turbo"),
            ("openai", "gpt-4.1-mini"),
            ("openai", "o1"),
            ("openai", "o3-mini"),
            ("openai", "o4-mini"),
            ("anthropic", "claude-3-opus-20240229"),
            ("anthropic", "claude-3-sonnet-20240229"),
            ("anthropic", "claude-3-haiku"),
            ("anthropic", "claude-3-7-sonnet-20250219"),
            ("anthropic", "claude-sonnet-4-20250514"),
            ("anthropic", "claude-3-opus-latest"),
            ("gemini", "gemini-pro"),
            ("gemini", "gemini-1.5-pro"),
            ("gemini", "gemini-1.5-flash"),
        ] {
            let p = t.price(provider, model);
            assert!(
                p.is_some_and(|p| p.context_length.is_some() && p.output_per_million > 0.0),
                "{provider}/{model}: {p:?}"
            );
        }
        assert!(close(
            t.cost("anthropic", "claude-3-opus-20240229", &usage),
            15.0 + 37.5
        ));
        assert!(
            close(
                t.cost(
                    "openai",
                    "ft:gpt-4o-mini-2024-07-18:muse:poems:ftjob-1",
                    &usage
                ),
                0.3 + 0.6
            ),
            "fine-tunes at the fine-tuned price of their base"
        );
        assert_eq!(t.cost("openai", "ft:davinci-002:x:y:z", &usage), None);
        assert_eq!(
            t.cost("openai", "my-finetune", &usage),
            None,
            "unknown is unknown, not 0"
        );
        assert_eq!(
            t.cost("anthropic", "gpt-4o", &usage),
            None,
            "prices are per provider"
        );
    }

    #[test]
    fn overrides_layer_on_top_and_are_validated() {
        let dir = std::env::temp_dir().join(format!("muse-prices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(&good, r#"{"openai/gpt-4o": {"input_per_million": 1, "output_per_million": 2}, "vllm/llama": {"input_per_million": 0, "output_per_million": 0}}"#).unwrap();
        let t = PriceTable::builtin().with_overrides(&good).unwrap();
        assert_eq!(t.price("openai", "gpt-4o").unwrap().output_per_million, 2.0);
        assert_eq!(
            t.cost(
                "vllm",
                "llama",
                &Usage {
                    prompt_tokens: 10,
                    completion_tokens: 10
                }
            ),
            Some(0.0)
        );
        let bad = dir.join("bad.json");
        std::fs::write(
            &bad,
            r#"{"openai/gpt-4o": {"input_per_million": -1, "output_per_million": 2}}"#,
        )
        .unwrap();
        assert!(PriceTable::builtin().with_overrides(&bad).is_err());
        assert!(PriceTable::builtin()
            .with_overrides(&dir.join("missing.json"))
            .is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
