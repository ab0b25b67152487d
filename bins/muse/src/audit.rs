//! Writing audit events from request handlers (on the blocking pool; the
//! answer waits for the row, so what the audit log says has happened).

use muse_auth::RequestContext;
use uuid::Uuid;

use crate::state::AppState;

/// Records `event` by `actor` (None: the system, e.g. Stripe) about
/// `subject`, with `detail`.
pub async fn record(
    state: &AppState,
    actor: Option<Uuid>,
    event: &'static str,
    subject: Option<String>,
    ctx: RequestContext,
    detail: serde_json::Value,
) {
    let auth = state.auth.clone();
    let _ = actix_web::web::block(move || {
        auth.audit(actor, event, subject.as_deref(), &ctx, Some(detail));
    })
    .await;
}
