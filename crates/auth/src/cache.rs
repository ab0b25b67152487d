//! Verified callers kept in memory, so that a request with a known access
//! token or API key needs no database read.
//!
//! Correctness rests on two rules:
//! - **in this process, at once**: every change that can end a caller's
//!   access (logout, key revocation, suspension, role change, password
//!   reset, refresh-token reuse) calls [`PrincipalCache::forget_user`],
//!   which invalidates every entry of that user, including one being read
//!   from the database at that very moment (entries remember the epoch
//!   their read began in, and an entry older than the user's last
//!   revocation is never served);
//! - **elsewhere, within the TTL**: another replica's change reaches this
//!   one when its entries expire ([`PrincipalCache::new`]'s `ttl_ms`), or at
//!   once when the server relays revocations between replicas (it calls
//!   `forget_user` for each one it hears of).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use uuid::Uuid;

use crate::model::Principal;

/// What identifies a cached caller: a session (for JWT access tokens, whose
/// signature and expiry are still checked on every request) or the digest
/// of an API key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CacheKey {
    Session(Uuid),
    ApiKey(String),
    /// An API key by id: what an open connection's caller was checked
    /// with ([`crate::AuthService::revalidate`]).
    ApiKeyId(Uuid),
}

#[derive(Debug, Clone)]
struct Entry {
    principal: Principal,
    cached_at: i64,
    /// The epoch the database read began in.
    epoch: u64,
    /// An API key's own expiry.
    expires_at: Option<i64>,
}

/// Most entries kept; beyond, the cache starts over (a bound, not an LRU).
const MAX_ENTRIES: usize = 100_000;

pub struct PrincipalCache {
    ttl_ms: i64,
    entries: RwLock<HashMap<CacheKey, Entry>>,
    /// Per user: the epoch of their last revocation.
    revoked: RwLock<HashMap<Uuid, u64>>,
    epoch: AtomicU64,
    /// The epoch since which every replica's revocations reach this cache
    /// as they happen (0: they do not; see [`PrincipalCache::set_relayed`]).
    relayed_from: AtomicU64,
}

impl std::fmt::Debug for PrincipalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrincipalCache")
            .field("ttl_ms", &self.ttl_ms)
            .finish_non_exhaustive()
    }
}

impl PrincipalCache {
    /// A cache whose entries live `ttl_ms` milliseconds (0 disables it).
    pub fn new(ttl_ms: i64) -> Self {
        Self {
            ttl_ms,
            entries: RwLock::new(HashMap::new()),
            revoked: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(1),
            relayed_from: AtomicU64::new(0),
        }
    }

    pub fn ttl_ms(&self) -> i64 {
        self.ttl_ms
    }

    /// The epoch to pass to [`PrincipalCache::insert`]: read it *before*
    /// reading the caller from the database.
    pub fn begin(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The cached caller for `key` at `now`, if still valid.
    pub fn get(&self, key: &CacheKey, now: i64) -> Option<Principal> {
        if self.ttl_ms <= 0 {
            return None;
        }
        let entry = self.entries.read().ok()?.get(key).cloned()?;
        if now - entry.cached_at >= self.ttl_ms || entry.expires_at.is_some_and(|e| e <= now) {
            return None;
        }
        let revoked = self
            .revoked
            .read()
            .ok()?
            .get(&entry.principal.user.id)
            .copied()
            .unwrap_or(0);
        (entry.epoch >= revoked).then_some(entry.principal)
    }

    /// Keeps a caller read from the database in epoch `epoch`.
    pub fn insert(
        &self,
        key: CacheKey,
        principal: Principal,
        epoch: u64,
        now: i64,
        expires_at: Option<i64>,
    ) {
        if self.ttl_ms <= 0 {
            return;
        }
        if let Ok(mut entries) = self.entries.write() {
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(
                key,
                Entry {
                    principal,
                    cached_at: now,
                    epoch,
                    expires_at,
                },
            );
        }
    }

    /// Every cached entry of `user_id` stops being served, including one
    /// whose database read is under way.
    pub fn forget_user(&self, user_id: Uuid) {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut revoked) = self.revoked.write() {
            revoked.insert(user_id, epoch);
            // Entries expire within the TTL; so can their revocation marks
            // once there are many.
            if revoked.len() > MAX_ENTRIES {
                revoked.clear();
                if let Ok(mut entries) = self.entries.write() {
                    entries.clear();
                }
            }
        }
        if let Ok(mut entries) = self.entries.write() {
            entries.retain(|_, e| e.principal.user.id != user_id);
        }
    }

    /// Says whether every replica's revocations reach this cache as they
    /// happen (the server's Redis relay is subscribed). Revocations made
    /// while it was not may have been missed: a connection checked before
    /// the relay came (back) up is not covered by it
    /// ([`PrincipalCache::relayed_since`]).
    pub fn set_relayed(&self, up: bool) {
        if up {
            let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            self.relayed_from.store(epoch, Ordering::SeqCst);
        } else {
            self.relayed_from.store(0, Ordering::SeqCst);
        }
    }

    /// Whether a caller checked in `epoch` would have heard of every
    /// revocation since (by [`PrincipalCache::revoked_since`]): the relay is
    /// up and has been since before that check.
    pub fn relayed_since(&self, epoch: u64) -> bool {
        let from = self.relayed_from.load(Ordering::SeqCst);
        from > 0 && epoch >= from
    }

    /// Whether `user_id` lost access (any revocation) after `epoch`: an
    /// open connection authenticated in `epoch` must check its caller again.
    pub fn revoked_since(&self, user_id: Uuid, epoch: u64) -> bool {
        self.revoked
            .read()
            .ok()
            .and_then(|r| r.get(&user_id).copied())
            .is_some_and(|r| r > epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AuthMethod, Role, User, UserStatus};

    fn principal(id: Uuid) -> Principal {
        Principal {
            user: User {
                id,
                email: "a@example.com".into(),
                username: "a".into(),
                password_hash: String::new(),
                role: Role::User,
                status: UserStatus::Active,
                email_verified_at: Some(0),
                created_at: 0,
                updated_at: 0,
            },
            method: AuthMethod::ApiKey {
                key_id: id,
                expires_at: None,
            },
        }
    }

    #[test]
    fn entries_expire_and_revocations_win_even_against_reads_under_way() {
        let cache = PrincipalCache::new(1_000);
        let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let k = CacheKey::ApiKey("a".into());
        let e = cache.begin();
        cache.insert(k.clone(), principal(alice), e, 0, None);
        assert!(cache.get(&k, 999).is_some());
        assert!(cache.get(&k, 1_000).is_none(), "the TTL bounds staleness");

        cache.insert(k.clone(), principal(alice), cache.begin(), 0, None);
        cache.forget_user(bob);
        assert!(cache.get(&k, 1).is_some(), "another user's revocation");
        cache.forget_user(alice);
        assert!(cache.get(&k, 1).is_none(), "at once");

        // A read that began before the revocation is not served after it.
        let before = cache.begin();
        cache.forget_user(alice);
        cache.insert(k.clone(), principal(alice), before, 2, None);
        assert!(cache.get(&k, 3).is_none());
        assert!(cache.revoked_since(alice, before));
        let after = cache.begin();
        cache.insert(k.clone(), principal(alice), after, 2, None);
        assert!(cache.get(&k, 3).is_some());
        assert!(!cache.revoked_since(alice, after));

        // Expiring keys, and a disabled cache.
        cache.insert(k.clone(), principal(alice), cache.begin(), 0, Some(5));
        assert!(cache.get(&k, 5).is_none());
        let off = PrincipalCache::new(0);
        off.insert(k.clone(), principal(alice), off.begin(), 0, None);
        assert!(off.get(&k, 0).is_none());
    }
}
