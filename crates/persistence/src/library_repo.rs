//! [`LibraryRepository`] and [`IdeaRepository`] on diesel.

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use muse_core::{Page, PageRequest};
use muse_prompts::{
    DeleteOutcome, ExpertPrompt, Idea, IdeaFilter, IdeaRepository, IdeaStoreError, LibraryError,
    LibraryRepository, ListFilter, ParentFilter, PromptContent, PromptVersion, Specialty, Viewer,
};
use uuid::Uuid;

use crate::db::Database;
use crate::schema::{expert_prompt_versions, expert_prompts, ideas, specialties};

use crate::db::lower;

/// The prompt library and ideas on SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub struct DieselLibraryRepository {
    db: Database,
}

impl DieselLibraryRepository {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    fn conn(&self) -> Result<crate::db::PooledConn, LibraryError> {
        self.db
            .get()
            .map_err(|e| LibraryError::Unavailable(e.to_string()))
    }
}

fn map_err(e: DieselError) -> LibraryError {
    if crate::is_unavailable(&e) {
        return LibraryError::Unavailable(e.to_string());
    }
    match e {
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
            LibraryError::Conflict("the item was changed at the same time; try again".into())
        }
        DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _) => {
            LibraryError::Conflict("the item is still referenced, or its parent is gone".into())
        }
        DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
            LibraryError::Unavailable(info.message().to_string())
        }
        other => LibraryError::Other(other.to_string()),
    }
}

fn corrupt(what: &str) -> LibraryError {
    LibraryError::Other(format!("corrupt library row: {what}"))
}

fn uuid(s: &str) -> Result<Uuid, LibraryError> {
    Uuid::parse_str(s).map_err(|_| corrupt("uuid"))
}

fn opt_uuid(s: Option<String>) -> Result<Option<Uuid>, LibraryError> {
    s.as_deref().map(uuid).transpose()
}

/// `%value%` for LIKE, with `\`, `%` and `_` escaped (escape char `\`).
fn like_pattern(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('%');
    for c in value.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

#[derive(Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = specialties, treat_none_as_null = true)]
struct SpecialtyRow {
    id: String,
    parent_id: Option<String>,
    owner_id: Option<String>,
    name: String,
    description: String,
    published: bool,
    created_at: i64,
    updated_at: i64,
    icon_url: Option<String>,
}

impl SpecialtyRow {
    fn from_domain(s: &Specialty) -> Self {
        Self {
            id: s.id.to_string(),
            parent_id: s.parent_id.map(|p| p.to_string()),
            owner_id: s.owner_id.map(|p| p.to_string()),
            name: s.name.clone(),
            description: s.description.clone(),
            published: s.published,
            created_at: s.created_at,
            updated_at: s.updated_at,
            icon_url: s.icon_url.clone(),
        }
    }

    fn into_domain(self) -> Result<Specialty, LibraryError> {
        Ok(Specialty {
            id: uuid(&self.id)?,
            parent_id: opt_uuid(self.parent_id)?,
            owner_id: opt_uuid(self.owner_id)?,
            name: self.name,
            description: self.description,
            published: self.published,
            created_at: self.created_at,
            updated_at: self.updated_at,
            icon_url: self.icon_url,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = expert_prompts)]
struct PromptRow {
    id: String,
    sub_specialty_id: String,
    owner_id: Option<String>,
    published: bool,
    current_version: i32,
    title: String,
    tags: String,
    created_at: i64,
    updated_at: i64,
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = expert_prompt_versions)]
struct VersionRow {
    prompt_id: String,
    version: i32,
    title: String,
    description: String,
    template: String,
    variables_schema: String,
    expected_output: Option<String>,
    tags: String,
    created_by: Option<String>,
    created_at: i64,
}

fn tags_json(tags: &[String]) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "[]".into())
}

impl VersionRow {
    fn from_domain(v: &PromptVersion) -> Self {
        let c = &v.content;
        Self {
            prompt_id: v.prompt_id.to_string(),
            version: v.version,
            title: c.title.clone(),
            description: c.description.clone(),
            template: c.template.clone(),
            variables_schema: c.variables_schema.to_string(),
            expected_output: c.expected_output.clone(),
            tags: tags_json(&c.tags),
            created_by: v.created_by.map(|u| u.to_string()),
            created_at: v.created_at,
        }
    }

    fn into_domain(self) -> Result<PromptVersion, LibraryError> {
        Ok(PromptVersion {
            prompt_id: uuid(&self.prompt_id)?,
            version: self.version,
            content: PromptContent {
                title: self.title,
                description: self.description,
                template: self.template,
                variables_schema: serde_json::from_str(&self.variables_schema)
                    .map_err(|_| corrupt("variables_schema"))?,
                expected_output: self.expected_output,
                tags: serde_json::from_str(&self.tags).map_err(|_| corrupt("tags"))?,
            },
            created_by: opt_uuid(self.created_by)?,
            created_at: self.created_at,
        })
    }
}

fn prompt_from(row: PromptRow, version: VersionRow) -> Result<ExpertPrompt, LibraryError> {
    let v = version.into_domain()?;
    Ok(ExpertPrompt {
        id: uuid(&row.id)?,
        sub_specialty_id: uuid(&row.sub_specialty_id)?,
        owner_id: opt_uuid(row.owner_id)?,
        published: row.published,
        version: row.current_version,
        content: v.content,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

fn prompt_row(p: &ExpertPrompt) -> PromptRow {
    PromptRow {
        id: p.id.to_string(),
        sub_specialty_id: p.sub_specialty_id.to_string(),
        owner_id: p.owner_id.map(|u| u.to_string()),
        published: p.published,
        current_version: p.version,
        title: p.content.title.clone(),
        tags: tags_json(&p.content.tags),
        created_at: p.created_at,
        updated_at: p.updated_at,
    }
}

fn total(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl LibraryRepository for DieselLibraryRepository {
    fn insert_specialty(&self, s: &Specialty) -> Result<(), LibraryError> {
        let mut conn = self.conn()?;
        diesel::insert_into(specialties::table)
            .values(SpecialtyRow::from_domain(s))
            .execute(&mut *conn)
            .map(|_| ())
            .map_err(map_err)
    }

    fn specialty(&self, id: Uuid) -> Result<Option<Specialty>, LibraryError> {
        let mut conn = self.conn()?;
        specialties::table
            .find(id.to_string())
            .select(SpecialtyRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(map_err)?
            .map(SpecialtyRow::into_domain)
            .transpose()
    }

    fn update_specialty(&self, s: &Specialty) -> Result<(), LibraryError> {
        let mut conn = self.conn()?;
        let n = diesel::update(specialties::table.find(s.id.to_string()))
            .set(SpecialtyRow::from_domain(s))
            .execute(&mut *conn)
            .map_err(map_err)?;
        if n == 0 {
            return Err(LibraryError::NotFound("specialty"));
        }
        Ok(())
    }

    fn delete_specialty(&self, id: Uuid) -> Result<DeleteOutcome, LibraryError> {
        let mut conn = self.conn()?;
        let id = id.to_string();
        conn.transaction(|conn| {
            let children: i64 = specialties::table
                .filter(specialties::parent_id.eq(&id))
                .count()
                .get_result(conn)?;
            let prompts: i64 = expert_prompts::table
                .filter(expert_prompts::sub_specialty_id.eq(&id))
                .count()
                .get_result(conn)?;
            if children + prompts > 0 {
                return Ok(DeleteOutcome::HasChildren);
            }
            let n = diesel::delete(specialties::table.find(&id)).execute(conn)?;
            Ok(if n == 0 {
                DeleteOutcome::NotFound
            } else {
                DeleteOutcome::Deleted
            })
        })
        .map_err(map_err)
    }

    fn list_specialties(
        &self,
        viewer: Viewer,
        filter: &ListFilter,
        page: PageRequest,
    ) -> Result<Page<Specialty>, LibraryError> {
        let mut conn = self.conn()?;
        let query = || {
            let mut q = specialties::table.into_boxed();
            if !viewer.is_admin {
                q = q.filter(
                    specialties::published
                        .eq(true)
                        .or(specialties::owner_id.eq(viewer.user_id.to_string())),
                );
            }
            q = match filter.parent {
                ParentFilter::Any => q,
                ParentFilter::None => q.filter(specialties::parent_id.is_null()),
                ParentFilter::Some => q.filter(specialties::parent_id.is_not_null()),
                ParentFilter::Of(p) => q.filter(specialties::parent_id.eq(p.to_string())),
            };
            if let Some(text) = &filter.q {
                q = q.filter(
                    lower(specialties::name)
                        .like(like_pattern(&text.to_lowercase()))
                        .escape('\\'),
                );
            }
            if let Some(owner) = filter.owner_id {
                q = q.filter(specialties::owner_id.eq(owner.to_string()));
            }
            q
        };
        let n: i64 = query().count().get_result(&mut *conn).map_err(map_err)?;
        let items = query()
            .order((specialties::name.asc(), specialties::id.asc()))
            .offset(page.offset())
            .limit(page.limit())
            .select(SpecialtyRow::as_select())
            .load(&mut *conn)
            .map_err(map_err)?
            .into_iter()
            .map(SpecialtyRow::into_domain)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::new(items, page, total(n)))
    }

    fn insert_prompt(
        &self,
        p: &ExpertPrompt,
        created_by: Option<Uuid>,
    ) -> Result<(), LibraryError> {
        let mut conn = self.conn()?;
        let version = VersionRow::from_domain(&PromptVersion {
            prompt_id: p.id,
            version: p.version,
            content: p.content.clone(),
            created_by,
            created_at: p.created_at,
        });
        conn.transaction(|conn| {
            diesel::insert_into(expert_prompts::table)
                .values(prompt_row(p))
                .execute(conn)?;
            diesel::insert_into(expert_prompt_versions::table)
                .values(version)
                .execute(conn)
        })
        .map(|_| ())
        .map_err(map_err)
    }

    fn prompt(&self, id: Uuid) -> Result<Option<ExpertPrompt>, LibraryError> {
        let mut conn = self.conn()?;
        expert_prompts::table
            .inner_join(
                expert_prompt_versions::table.on(expert_prompt_versions::prompt_id
                    .eq(expert_prompts::id)
                    .and(expert_prompt_versions::version.eq(expert_prompts::current_version))),
            )
            .filter(expert_prompts::id.eq(id.to_string()))
            .select((PromptRow::as_select(), VersionRow::as_select()))
            .first::<(PromptRow, VersionRow)>(&mut *conn)
            .optional()
            .map_err(map_err)?
            .map(|(p, v)| prompt_from(p, v))
            .transpose()
    }

    fn update_prompt(
        &self,
        p: &ExpertPrompt,
        expected_version: i32,
        new_version: Option<&PromptVersion>,
    ) -> Result<(), LibraryError> {
        let mut conn = self.conn()?;
        let row = prompt_row(p);
        let version = new_version.map(VersionRow::from_domain);
        conn.transaction(|conn| {
            let n = diesel::update(
                expert_prompts::table
                    .filter(expert_prompts::id.eq(&row.id))
                    .filter(expert_prompts::current_version.eq(expected_version)),
            )
            .set((
                expert_prompts::sub_specialty_id.eq(&row.sub_specialty_id),
                expert_prompts::published.eq(row.published),
                expert_prompts::current_version.eq(row.current_version),
                expert_prompts::title.eq(&row.title),
                expert_prompts::tags.eq(&row.tags),
                expert_prompts::updated_at.eq(row.updated_at),
            ))
            .execute(conn)?;
            if n == 0 {
                return Ok(false);
            }
            if let Some(v) = version {
                diesel::insert_into(expert_prompt_versions::table)
                    .values(v)
                    .execute(conn)?;
            }
            Ok(true)
        })
        .map_err(map_err)
        .and_then(|updated| {
            if updated {
                Ok(())
            } else {
                Err(LibraryError::Conflict(
                    "the prompt was edited at the same time; read it again and retry".into(),
                ))
            }
        })
    }

    fn delete_prompt(&self, id: Uuid) -> Result<DeleteOutcome, LibraryError> {
        let mut conn = self.conn()?;
        let id = id.to_string();
        conn.transaction(|conn| {
            diesel::delete(
                expert_prompt_versions::table.filter(expert_prompt_versions::prompt_id.eq(&id)),
            )
            .execute(conn)?;
            diesel::delete(expert_prompts::table.find(&id)).execute(conn)
        })
        .map(|n| {
            if n == 0 {
                DeleteOutcome::NotFound
            } else {
                DeleteOutcome::Deleted
            }
        })
        .map_err(map_err)
    }

    fn list_prompts(
        &self,
        viewer: Viewer,
        filter: &ListFilter,
        page: PageRequest,
    ) -> Result<Page<ExpertPrompt>, LibraryError> {
        let mut conn = self.conn()?;
        let query = || {
            let mut q = expert_prompts::table
                .inner_join(
                    expert_prompt_versions::table.on(expert_prompt_versions::prompt_id
                        .eq(expert_prompts::id)
                        .and(expert_prompt_versions::version.eq(expert_prompts::current_version))),
                )
                .into_boxed();
            if !viewer.is_admin {
                q = q.filter(
                    expert_prompts::published
                        .eq(true)
                        .or(expert_prompts::owner_id.eq(viewer.user_id.to_string())),
                );
            }
            if let ParentFilter::Of(p) = filter.parent {
                q = q.filter(expert_prompts::sub_specialty_id.eq(p.to_string()));
            }
            if let Some(text) = &filter.q {
                q = q.filter(
                    lower(expert_prompts::title)
                        .like(like_pattern(&text.to_lowercase()))
                        .escape('\\'),
                );
            }
            if let Some(tag) = &filter.tag {
                let quoted = serde_json::to_string(&tag.to_lowercase()).unwrap_or_default();
                q = q.filter(
                    expert_prompts::tags
                        .like(like_pattern(&quoted))
                        .escape('\\'),
                );
            }
            if let Some(owner) = filter.owner_id {
                q = q.filter(expert_prompts::owner_id.eq(owner.to_string()));
            }
            q
        };
        let n: i64 = query().count().get_result(&mut *conn).map_err(map_err)?;
        let items = query()
            .order((expert_prompts::updated_at.desc(), expert_prompts::id.desc()))
            .offset(page.offset())
            .limit(page.limit())
            .select((PromptRow::as_select(), VersionRow::as_select()))
            .load::<(PromptRow, VersionRow)>(&mut *conn)
            .map_err(map_err)?
            .into_iter()
            .map(|(p, v)| prompt_from(p, v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::new(items, page, total(n)))
    }

    fn prompt_versions(
        &self,
        id: Uuid,
        page: PageRequest,
    ) -> Result<Page<PromptVersion>, LibraryError> {
        let mut conn = self.conn()?;
        let id = id.to_string();
        let n: i64 = expert_prompt_versions::table
            .filter(expert_prompt_versions::prompt_id.eq(&id))
            .count()
            .get_result(&mut *conn)
            .map_err(map_err)?;
        let items = expert_prompt_versions::table
            .filter(expert_prompt_versions::prompt_id.eq(&id))
            .order(expert_prompt_versions::version.desc())
            .offset(page.offset())
            .limit(page.limit())
            .select(VersionRow::as_select())
            .load(&mut *conn)
            .map_err(map_err)?
            .into_iter()
            .map(VersionRow::into_domain)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::new(items, page, total(n)))
    }

    fn prompt_version(
        &self,
        id: Uuid,
        version: i32,
    ) -> Result<Option<PromptVersion>, LibraryError> {
        let mut conn = self.conn()?;
        expert_prompt_versions::table
            .find((id.to_string(), version))
            .select(VersionRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(map_err)?
            .map(VersionRow::into_domain)
            .transpose()
    }
}

// ----- ideas ------------------------------------------------------------

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = ideas)]
pub(crate) struct IdeaRow {
    pub(crate) id: String,
    pub(crate) user_id: String,
    pub(crate) execution_id: String,
    pub(crate) prompt: Option<String>,
    pub(crate) category: Option<String>,
    pub(crate) theme: Option<String>,
    pub(crate) creativity: i32,
    pub(crate) provider: String,
    pub(crate) model: String,
    pub(crate) content: String,
    pub(crate) rating: Option<i32>,
    pub(crate) favorite: bool,
    pub(crate) created_at: i64,
}

fn idea_err(e: LibraryError) -> IdeaStoreError {
    match e {
        LibraryError::Unavailable(m) => IdeaStoreError::Unavailable(m),
        other => IdeaStoreError::Other(other.to_string()),
    }
}

impl IdeaRow {
    pub(crate) fn from_domain(i: &Idea) -> Self {
        Self {
            id: i.id.to_string(),
            user_id: i.user_id.to_string(),
            execution_id: i.execution_id.to_string(),
            prompt: crate::storable_opt(&i.prompt),
            category: crate::storable_opt(&i.category),
            theme: crate::storable_opt(&i.theme),
            creativity: i32::from(i.creativity),
            provider: crate::storable(&i.provider).into_owned(),
            model: crate::storable(&i.model).into_owned(),
            content: crate::storable(&i.content).into_owned(),
            rating: i.rating.map(i32::from),
            favorite: i.favorite,
            created_at: i.created_at,
        }
    }

    fn into_domain(self) -> Result<Idea, IdeaStoreError> {
        let bad = |w: &str| IdeaStoreError::Other(format!("corrupt idea row: {w}"));
        Ok(Idea {
            id: Uuid::parse_str(&self.id).map_err(|_| bad("id"))?,
            user_id: Uuid::parse_str(&self.user_id).map_err(|_| bad("user_id"))?,
            execution_id: Uuid::parse_str(&self.execution_id).map_err(|_| bad("execution_id"))?,
            prompt: self.prompt,
            category: self.category,
            theme: self.theme,
            creativity: u8::try_from(self.creativity).map_err(|_| bad("creativity"))?,
            provider: self.provider,
            model: self.model,
            content: self.content,
            rating: self.rating.and_then(|r| u8::try_from(r).ok()),
            favorite: self.favorite,
            created_at: self.created_at,
        })
    }
}

impl DieselLibraryRepository {
    fn idea_row(
        &self,
        conn: &mut crate::db::DbConnection,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<Idea>, IdeaStoreError> {
        ideas::table
            .filter(ideas::id.eq(id.to_string()))
            .filter(ideas::user_id.eq(user_id.to_string()))
            .select(IdeaRow::as_select())
            .first(conn)
            .optional()
            .map_err(|e| idea_err(map_err(e)))?
            .map(IdeaRow::into_domain)
            .transpose()
    }
}

impl IdeaRepository for DieselLibraryRepository {
    fn insert(&self, idea: &Idea) -> Result<(), IdeaStoreError> {
        let row = IdeaRow::from_domain(idea);
        self.db
            .write(|conn| diesel::insert_into(ideas::table).values(row).execute(conn))
            .map_err(|e| IdeaStoreError::Unavailable(e.to_string()))?
            .map(|_| ())
            .map_err(|e| idea_err(map_err(e)))
    }

    fn get(&self, user_id: Uuid, id: Uuid) -> Result<Option<Idea>, IdeaStoreError> {
        let mut conn = self.conn().map_err(idea_err)?;
        self.idea_row(&mut conn, user_id, id)
    }

    fn list(
        &self,
        user_id: Uuid,
        filter: &IdeaFilter,
        page: PageRequest,
    ) -> Result<Page<Idea>, IdeaStoreError> {
        let mut conn = self.conn().map_err(idea_err)?;
        let query = || {
            let mut q = ideas::table
                .filter(ideas::user_id.eq(user_id.to_string()))
                .into_boxed();
            if let Some(r) = filter.rating {
                q = q.filter(ideas::rating.eq(i32::from(r)));
            }
            if let Some(r) = filter.min_rating {
                q = q.filter(ideas::rating.ge(i32::from(r)));
            }
            if let Some(c) = &filter.category {
                q = q.filter(lower(ideas::category.assume_not_null()).eq(c.to_lowercase()));
            }
            if let Some(f) = filter.favorite {
                q = q.filter(ideas::favorite.eq(f));
            }
            q
        };
        let n: i64 = query()
            .count()
            .get_result(&mut *conn)
            .map_err(|e| idea_err(map_err(e)))?;
        let items = query()
            .order((ideas::created_at.desc(), ideas::id.desc()))
            .offset(page.offset())
            .limit(page.limit())
            .select(IdeaRow::as_select())
            .load(&mut *conn)
            .map_err(|e| idea_err(map_err(e)))?
            .into_iter()
            .map(IdeaRow::into_domain)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::new(items, page, total(n)))
    }

    fn update(
        &self,
        user_id: Uuid,
        id: Uuid,
        rating: Option<u8>,
        favorite: Option<bool>,
    ) -> Result<Option<Idea>, IdeaStoreError> {
        let mut conn = self.conn().map_err(idea_err)?;
        let target = ideas::table
            .filter(ideas::id.eq(id.to_string()))
            .filter(ideas::user_id.eq(user_id.to_string()));
        let n = match (rating, favorite) {
            (Some(r), Some(f)) => diesel::update(target)
                .set((ideas::rating.eq(Some(i32::from(r))), ideas::favorite.eq(f)))
                .execute(&mut *conn),
            (Some(r), None) => diesel::update(target)
                .set(ideas::rating.eq(Some(i32::from(r))))
                .execute(&mut *conn),
            (None, Some(f)) => diesel::update(target)
                .set(ideas::favorite.eq(f))
                .execute(&mut *conn),
            (None, None) => Ok(1),
        }
        .map_err(|e| idea_err(map_err(e)))?;
        if n == 0 {
            return Ok(None);
        }
        self.idea_row(&mut conn, user_id, id)
    }
}
