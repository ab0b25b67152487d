//! Streaming detokenisation: emit text as tokens arrive, never half a
//! UTF-8 character, and stop strings.

use tokenizers::Tokenizer;

/// Turns a growing list of token ids into text deltas.
pub struct Detokenizer {
    tokenizer: std::sync::Arc<Tokenizer>,
    ids: Vec<u32>,
    emitted: String,
}

impl Detokenizer {
    pub fn new(tokenizer: std::sync::Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: String::new(),
        }
    }

    /// Adds a token; returns the new text that is safe to show (may be empty
    /// while a multi-byte character is incomplete).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let full = self.tokenizer.decode(&self.ids, true).unwrap_or_default();
        if full.ends_with('\u{FFFD}') || !full.starts_with(&self.emitted) {
            return String::new();
        }
        let delta = full[self.emitted.len()..].to_string();
        self.emitted = full;
        delta
    }

    /// Whatever is left at the end (a dangling partial character shows as U+FFFD).
    pub fn finish(&mut self) -> String {
        let full = self.tokenizer.decode(&self.ids, true).unwrap_or_default();
        let delta = if full.starts_with(&self.emitted) {
            full[self.emitted.len()..].to_string()
        } else {
            String::new()
        };
        self.emitted = full;
        delta
    }

    pub fn text(&self) -> &str {
        &self.emitted
    }
}

/// Holds back text that could be the start of a stop string, and cuts at
/// the first complete one.
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Returns (text to emit, whether a stop string was reached).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for n in (1..s.len().min(self.pending.len() + 1)).rev() {
                if self.pending.is_char_boundary(self.pending.len() - n)
                    && s.is_char_boundary(n)
                    && self.pending.ends_with(&s[..n])
                {
                    keep = keep.max(n);
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_cut_and_partial_matches_held_back() {
        let mut f = StopFilter::new(&["###".to_string(), "END".to_string()]);
        assert_eq!(f.push("Hello #"), ("Hello ".to_string(), false));
        assert_eq!(f.push("# not"), ("## not".to_string(), false));
        assert_eq!(f.push(" yet E"), (" yet ".to_string(), false));
        assert_eq!(f.push("ND more"), (String::new(), true));
        let mut f = StopFilter::new(&[]);
        assert_eq!(f.push("anything"), ("anything".to_string(), false));
        let mut f = StopFilter::new(&["é!".to_string()]);
        assert_eq!(f.push("caf"), ("caf".to_string(), false));
        assert_eq!(f.push("é"), (String::new(), false));
        assert_eq!(f.flush(), "é");
    }
}
