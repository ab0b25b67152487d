//! Feature flags: an on/off switch, a percentage rollout that is stable per
//! user (the same user stays in or out as the percentage grows), and
//! allow-lists of users and plans. A flag nobody has written is on.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Flags that gate routes today.
pub mod known {
    /// `POST /api/v1/ai/generate/batch`.
    pub const BATCH_GENERATION: &str = "batch_generation";
    /// SSE endpoints and the WebSocket.
    pub const STREAMING: &str = "streaming";
    /// `provider.<id>`: calls to that provider's models (`provider.openai`).
    pub const PROVIDER_PREFIX: &str = "provider.";
    /// Fine-tuning jobs (training issue).
    pub const TRAINING: &str = "training";
}

/// Longest flag key.
pub const MAX_KEY_CHARS: usize = 64;
/// Most entries per allow-list.
pub const MAX_ALLOW: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureFlag {
    pub key: String,
    pub enabled: bool,
    /// 0–100: the share of users (stable per user) who get the feature.
    pub rollout_percent: u8,
    /// Always on for these users (when `enabled`).
    pub allow_users: Vec<Uuid>,
    /// Always on for users on these plans (when `enabled`).
    pub allow_plans: Vec<String>,
    pub description: String,
    pub updated_by: Option<Uuid>,
    pub updated_at: i64,
}

impl FeatureFlag {
    /// Whether `user` (on `plan`) gets the feature.
    pub fn allows(&self, user: Uuid, plan: Option<&str>) -> bool {
        if !self.enabled {
            return false;
        }
        if self.allow_users.contains(&user)
            || plan.is_some_and(|p| self.allow_plans.iter().any(|a| a == p))
        {
            return true;
        }
        bucket(&self.key, user) < self.rollout_percent
    }
}

/// The user's stable bucket (0–99) for `key`.
pub fn bucket(key: &str, user: Uuid) -> u8 {
    let digest = Sha256::new()
        .chain_update(key.as_bytes())
        .chain_update(b":")
        .chain_update(user.as_bytes())
        .finalize();
    let n = u64::from_be_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ]);
    (n % 100) as u8
}

/// Checks a flag written by an administrator; returns what is wrong.
pub fn validate(flag: &FeatureFlag) -> Result<(), String> {
    let k = &flag.key;
    if k.is_empty()
        || k.len() > MAX_KEY_CHARS
        || !k
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "key: 1 to {MAX_KEY_CHARS} of a-z, 0-9, '_', '.', '-'"
        ));
    }
    if flag.rollout_percent > 100 {
        return Err("rollout_percent must be between 0 and 100".into());
    }
    if flag.allow_users.len() > MAX_ALLOW || flag.allow_plans.len() > MAX_ALLOW {
        return Err(format!("at most {MAX_ALLOW} entries per allow-list"));
    }
    if flag.description.chars().count() > 500 {
        return Err("description: at most 500 characters".into());
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum FlagStoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

/// Storage of flags. Blocking.
pub trait FlagRepository: Send + Sync + 'static {
    fn list_flags(&self) -> Result<Vec<FeatureFlag>, FlagStoreError>;
    fn upsert_flag(&self, flag: &FeatureFlag) -> Result<(), FlagStoreError>;
}

/// A snapshot of every flag, evaluated in memory.
#[derive(Debug, Clone, Default)]
pub struct FlagSet {
    flags: HashMap<String, FeatureFlag>,
}

impl FlagSet {
    pub fn new(flags: Vec<FeatureFlag>) -> Self {
        Self {
            flags: flags.into_iter().map(|f| (f.key.clone(), f)).collect(),
        }
    }

    /// Whether `user` gets `key` (a flag with no row is on).
    pub fn allows(&self, key: &str, user: Uuid, plan: Option<&str>) -> bool {
        self.flags.get(key).is_none_or(|f| f.allows(user, plan))
    }

    pub fn get(&self, key: &str) -> Option<&FeatureFlag> {
        self.flags.get(key)
    }

    pub fn all(&self) -> Vec<FeatureFlag> {
        let mut v: Vec<FeatureFlag> = self.flags.values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(percent: u8) -> FeatureFlag {
        FeatureFlag {
            key: "streaming".into(),
            enabled: true,
            rollout_percent: percent,
            allow_users: vec![],
            allow_plans: vec![],
            description: String::new(),
            updated_by: None,
            updated_at: 0,
        }
    }

    #[test]
    fn rollout_is_stable_and_grows_monotonically() {
        let users: Vec<Uuid> = (0..2_000u128).map(Uuid::from_u128).collect();
        let share = |p: u8| users.iter().filter(|u| flag(p).allows(**u, None)).count();
        assert_eq!(share(0), 0);
        assert_eq!(share(100), users.len());
        let quarter = share(25);
        assert!((400..600).contains(&quarter), "{quarter}");
        // Everyone in at 25 % is still in at 50 %.
        assert!(users
            .iter()
            .filter(|u| flag(25).allows(**u, None))
            .all(|u| flag(50).allows(*u, None)));
    }

    #[test]
    fn switches_and_allow_lists() {
        let u = Uuid::from_u128(7);
        let mut f = flag(0);
        assert!(!f.allows(u, Some("pro")));
        f.allow_plans = vec!["pro".into()];
        assert!(f.allows(u, Some("pro")) && !f.allows(u, Some("free")));
        f.allow_users = vec![u];
        assert!(f.allows(u, None));
        f.enabled = false;
        assert!(!f.allows(u, Some("pro")), "off means off");
        let set = FlagSet::new(vec![f]);
        assert!(!set.allows("streaming", u, None));
        assert!(set.allows("never_written", u, None), "unknown flags are on");
        assert!(validate(&flag(101)).is_err());
        let mut bad = flag(5);
        bad.key = "Bad Key".into();
        assert!(validate(&bad).is_err());
    }
}
