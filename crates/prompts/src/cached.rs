//! Expert prompts kept in memory for a short while, so that a model call
//! (an idea, an execution) learns its prompt without reading the database.
//! Every write through this repository clears what it could make stale at
//! once; a change made by another process is seen within the TTL, or at
//! once when it is relayed ([`CachedLibrary::on_change`],
//! [`CachedLibrary::forget`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use muse_core::{Page, PageRequest};

use crate::library::{
    DeleteOutcome, ExpertPrompt, LibraryError, LibraryRepository, ListFilter, PromptVersion,
    Specialty, Viewer,
};

/// Most cached prompts before the cache starts over.
const MAX_ENTRIES: usize = 10_000;

/// A [`LibraryRepository`] whose `prompt` answers are cached for `ttl`
/// (visibility is still checked by [`crate::Library`] on every read).
pub struct CachedLibrary {
    inner: Arc<dyn LibraryRepository>,
    ttl: Duration,
    prompts: RwLock<HashMap<Uuid, (Option<ExpertPrompt>, Instant)>>,
    on_change: RwLock<Option<PromptChangeHook>>,
}

/// Who is told of the prompts written through this process: `Some(id)`,
/// or `None` for "any prompt" (a deleted specialty).
pub type PromptChangeHook = Arc<dyn Fn(Option<Uuid>) + Send + Sync>;

impl CachedLibrary {
    pub fn new(inner: Arc<dyn LibraryRepository>, ttl: Duration) -> Self {
        Self {
            inner,
            ttl,
            prompts: RwLock::default(),
            on_change: RwLock::default(),
        }
    }

    /// Registers who is told of the prompts written here (the server
    /// relays them to other replicas).
    pub fn on_change(&self, hook: PromptChangeHook) {
        if let Ok(mut h) = self.on_change.write() {
            *h = Some(hook);
        }
    }

    /// A write here: forgotten at once, and told to the hook.
    fn changed(&self, id: Option<Uuid>) {
        self.forget(id);
        let hook = self.on_change.read().ok().and_then(|h| h.clone());
        if let Some(hook) = hook {
            hook(id);
        }
    }

    /// Prompt `id` if it is cached and fresh, without reading storage
    /// (`None`: not cached; `Some(None)`: cached as missing).
    pub fn peek(&self, id: Uuid) -> Option<Option<ExpertPrompt>> {
        if self.ttl.is_zero() {
            return None;
        }
        let (p, at) = self.prompts.read().ok()?.get(&id).cloned()?;
        (at.elapsed() < self.ttl).then_some(p)
    }

    /// Drops prompt `id` (every prompt with `None`).
    pub fn forget(&self, id: Option<Uuid>) {
        if let Ok(mut p) = self.prompts.write() {
            match id {
                Some(id) => {
                    p.remove(&id);
                }
                None => p.clear(),
            }
        }
    }
}

impl LibraryRepository for CachedLibrary {
    fn insert_specialty(&self, s: &Specialty) -> Result<(), LibraryError> {
        self.inner.insert_specialty(s)
    }

    fn specialty(&self, id: Uuid) -> Result<Option<Specialty>, LibraryError> {
        self.inner.specialty(id)
    }

    fn update_specialty(&self, s: &Specialty) -> Result<(), LibraryError> {
        self.inner.update_specialty(s)
    }

    fn delete_specialty(&self, id: Uuid) -> Result<DeleteOutcome, LibraryError> {
        let r = self.inner.delete_specialty(id);
        // Its prompts may go with it.
        self.changed(None);
        r
    }

    fn list_specialties(
        &self,
        viewer: Viewer,
        filter: &ListFilter,
        page: PageRequest,
    ) -> Result<Page<Specialty>, LibraryError> {
        self.inner.list_specialties(viewer, filter, page)
    }

    fn insert_prompt(
        &self,
        p: &ExpertPrompt,
        created_by: Option<Uuid>,
    ) -> Result<(), LibraryError> {
        let r = self.inner.insert_prompt(p, created_by);
        self.changed(Some(p.id));
        r
    }

    fn prompt(&self, id: Uuid) -> Result<Option<ExpertPrompt>, LibraryError> {
        if self.ttl.is_zero() {
            return self.inner.prompt(id);
        }
        if let Some((p, at)) = self.prompts.read().ok().and_then(|m| m.get(&id).cloned()) {
            if at.elapsed() < self.ttl {
                return Ok(p);
            }
        }
        let p = self.inner.prompt(id)?;
        if let Ok(mut m) = self.prompts.write() {
            if m.len() >= MAX_ENTRIES {
                m.clear();
            }
            m.insert(id, (p.clone(), Instant::now()));
        }
        Ok(p)
    }

    fn update_prompt(
        &self,
        p: &ExpertPrompt,
        expected_version: i32,
        new_version: Option<&PromptVersion>,
    ) -> Result<(), LibraryError> {
        let r = self.inner.update_prompt(p, expected_version, new_version);
        self.changed(Some(p.id));
        r
    }

    fn delete_prompt(&self, id: Uuid) -> Result<DeleteOutcome, LibraryError> {
        let r = self.inner.delete_prompt(id);
        self.changed(Some(id));
        r
    }

    fn list_prompts(
        &self,
        viewer: Viewer,
        filter: &ListFilter,
        page: PageRequest,
    ) -> Result<Page<ExpertPrompt>, LibraryError> {
        self.inner.list_prompts(viewer, filter, page)
    }

    fn prompt_versions(
        &self,
        id: Uuid,
        page: PageRequest,
    ) -> Result<Page<PromptVersion>, LibraryError> {
        self.inner.prompt_versions(id, page)
    }

    fn prompt_version(
        &self,
        id: Uuid,
        version: i32,
    ) -> Result<Option<PromptVersion>, LibraryError> {
        self.inner.prompt_version(id, version)
    }
}
