//! Choosing the next token from logits: greedy, or temperature with
//! top-k / top-p, a repetition penalty, and a seed for reproducibility.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 (or absent) means greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    /// > 1 discourages tokens already generated or in the prompt.
    pub repetition_penalty: f32,
    /// OpenAI's presence and frequency penalties, over the generated tokens:
    /// `logit[j] -= count[j] * frequency + (count[j] > 0) * presence`.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// OpenAI's `logit_bias`: added to a token's logit before sampling
    /// (-100 bans it, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Self { params, rng }
    }

    /// Picks a token; `history` is every token so far (prompt included),
    /// `generated` the ones this generation produced.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32], generated: &[u32]) -> u32 {
        self.adjust(logits, history, generated);
        self.choose(logits)
    }

    /// Applies the logit bias and the penalties (once per step).
    pub fn adjust(&self, logits: &mut [f32], history: &[u32], generated: &[u32]) {
        let p = &self.params;
        for &(t, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: std::collections::HashMap<u32, f32> = std::collections::HashMap::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1.0;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= c * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0 {
            // Once per distinct token, as transformers' gather/scatter does.
            let mut seen = std::collections::HashSet::with_capacity(history.len());
            for &t in history {
                if !seen.insert(t) {
                    continue;
                }
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
    }

    /// Picks a token from adjusted logits (`-inf` ones are never picked
    /// unless every logit is).
    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut idx: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        if idx.is_empty() {
            return argmax(logits);
        }
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = p.top_k.filter(|k| *k > 0) {
            idx.truncate(k);
        }
        let max = logits[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| f64::from((logits[i] - max) / p.temperature).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if let Some(top_p) = p.top_p.filter(|t| *t > 0.0 && *t < 1.0) {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= f64::from(top_p) {
                    keep = n + 1;
                    break;
                }
            }
            idx.truncate(keep);
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f64 = self.rng.gen();
        let mut acc = 0.0;
        for (i, q) in idx.iter().zip(&probs) {
            acc += q;
            if r < acc {
                return *i as u32;
            }
        }
        idx.last().map(|&i| i as u32).unwrap_or(0)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample_for_test(&mut [0.1, 3.0, 2.0], &[]), 1);
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone());
            (0..20)
                .map(|_| s.sample_for_test(&mut [1.0, 1.1, 0.9, 1.05], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params), "same seed, same draws");
        assert!(
            draw(&params)
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 1
        );
    }

    impl Sampler {
        fn sample_for_test(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
            self.sample(logits, history, history)
        }
    }

    #[test]
    fn presence_and_frequency_penalties_follow_openais_formula() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 1.0,
            ..Default::default()
        });
        let mut logits = [3.0, 3.2, 1.0];
        // Token 1 generated twice: 3.2 - 2 * 1.0 - 0.5; the prompt's token 2 is not penalised.
        assert_eq!(s.sample(&mut logits, &[2, 1, 1], &[1, 1]), 0);
        assert!(
            (logits[1] - 0.7).abs() < 1e-6 && logits[0] == 3.0 && logits[2] == 1.0,
            "{logits:?}"
        );
    }

    #[test]
    fn logit_bias_is_added_before_sampling() {
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(1, -100.0), (2, 5.0)],
            ..Default::default()
        });
        let mut logits = [1.0, 3.0, 0.0];
        assert_eq!(s.sample_for_test(&mut logits, &[]), 2);
        assert_eq!(logits, [1.0, -97.0, 5.0]);
    }

    #[test]
    fn top_k_top_p_and_repetition_penalty() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        for _ in 0..10 {
            assert_eq!(s.sample_for_test(&mut [0.0, 5.0, 4.9], &[]), 1);
        }
        let p = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.5),
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        for _ in 0..10 {
            assert_eq!(s.sample_for_test(&mut [0.0, 10.0, 1.0], &[]), 1);
        }
        let p = SamplingParams {
            repetition_penalty: 10.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        let mut logits = [1.0, 4.0, 1.5];
        s.sample_for_test(&mut logits, &[1, 1, 1]);
        assert_eq!(
            logits[1], 0.4,
            "once per distinct token, as transformers does"
        );
        assert_eq!(
            s.sample_for_test(&mut [1.0, 2.0, 1.5], &[1]),
            2,
            "the repeated token is penalised"
        );
    }
}
