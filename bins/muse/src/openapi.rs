//! The OpenAPI document, generated from the handlers, and the offline
//! Swagger UI (`/docs/`) and ReDoc (`/redoc`) that render it.

use actix_web::{web, HttpResponse};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_redoc::{Redoc, Servable};
use utoipa_swagger_ui::SwaggerUi;

use crate::error::{ErrorBody, ErrorDetail};
use crate::routes::openai::{OpenAiErrorBody, OpenAiErrorDetail};
use crate::routes::{
    admin, ai, auth, executions, ideas, library, openai, subscription, system, train,
};
use crate::ws;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Muse API",
        description = "Self-hostable AI backend. Errors always have the shape \
            `{\"error\": {\"code\", \"message\", \"details\"?}}`; codes are listed in docs/errors.md.",
        license(name = "Apache-2.0")
    ),
    paths(
        system::root, system::health, system::info, system::metrics,
        auth::register, auth::login, auth::refresh, auth::logout, auth::me,
        auth::create_api_key, auth::list_api_keys, auth::delete_api_key,
        auth::verify_email, auth::resend_verification, auth::forgot_password, auth::reset_password,
        ai::list_models, ai::load_model, ai::unload_model,
        openai::chat_completions, openai::completions, openai::list_models, openai::get_model, openai::embeddings,
        executions::history, executions::get_execution,
        library::list_specialties, library::create_specialty, library::get_specialty,
        library::update_specialty, library::delete_specialty,
        library::list_sub_specialties, library::create_sub_specialty, library::get_sub_specialty,
        library::update_sub_specialty, library::delete_sub_specialty,
        library::list_prompts, library::create_prompt, library::get_prompt, library::update_prompt,
        library::delete_prompt, library::list_versions, library::get_version,
        library::execute_prompt, library::execute_prompt_stream,
        ideas::generate, ideas::generate_batch, ideas::stream_ticket, ideas::stream_generate,
        ideas::history, ideas::get_idea, ideas::rate,
        ws::handshake,
        subscription::info, subscription::plans, subscription::usage, subscription::upgrade,
        subscription::cancel, subscription::history, subscription::webhook,
        admin::stats, admin::list_users, admin::suspend, admin::unsuspend, admin::set_role, admin::audit,
        admin::rate_limit_stats, admin::unblock, admin::list_flags, admin::upsert_flag,
        admin::set_plan, admin::put_plan, admin::pull_model, admin::list_pulls,
        train::upload, train::trainers, train::list_datasets, train::get_dataset, train::delete_dataset,
        train::start, train::list_jobs, train::status, train::stop, train::logs,
    ),
    components(schemas(ErrorBody, ErrorDetail, OpenAiErrorBody, OpenAiErrorDetail)),
    modifiers(&Security, &CommonResponses),
    tags(
        (name = "system", description = "Service information, health and metrics"),
        (name = "auth", description = "Accounts, sessions, API keys, email verification and password reset"),
        (name = "ai", description = "Models and generation"),
        (name = "executions", description = "The caller's recorded model calls"),
        (name = "library", description = "The prompt library: specialties, sub-specialties, versioned expert prompts, and their execution"),
        (name = "ideas", description = "Idea generation (one, batch, streamed), history and ratings"),
        (name = "websocket", description = "WebSocket protocol: docs/websocket.md"),
        (name = "admin", description = "Administrators only"),
        (name = "subscription", description = "Plans, usage against quotas, billing history"),
        (name = "training", description = "Fine-tuning: datasets, jobs, trainers (docs/training.md)"),
        (name = "openai", description = "OpenAI-compatible API: point an OpenAI SDK at /v1 with a Muse API key"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT access token or muse_sk_ API key")
                    .build(),
            ),
        );
    }
}

/// The errors every operation of a kind can give, declared once instead of
/// on each handler: 401 where credentials are required, 400 where a path or
/// query parameter can be malformed, 400/413/415/422 where a body is read.
/// On `/v1/*` every error is in OpenAI's shape ([`OpenAiErrorBody`]).
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};

        for (path, item) in openapi.paths.paths.iter_mut() {
            let openai = path.starts_with("/v1/");
            let (muse_body, body) = (
                Ref::from_schema_name("ErrorBody"),
                Ref::from_schema_name(if openai {
                    "OpenAiErrorBody"
                } else {
                    "ErrorBody"
                }),
            );
            let error = |description: &str| {
                RefOr::T(
                    ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            ContentBuilder::new().schema(Some(body.clone())).build(),
                        )
                        .build(),
                )
            };
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                let responses = &mut op.responses.responses;
                if openai {
                    for (_, response) in responses
                        .iter_mut()
                        .filter(|(s, _)| s.starts_with(['4', '5']))
                    {
                        let RefOr::T(response) = response else {
                            continue;
                        };
                        for content in response.content.values_mut() {
                            if matches!(&content.schema, Some(RefOr::Ref(r)) if *r == muse_body) {
                                content.schema = Some(RefOr::Ref(body.clone()));
                            }
                        }
                    }
                }
                let mut add = |status: &str, description: &str| {
                    responses
                        .entry(status.to_string())
                        .or_insert_with(|| error(description));
                };
                let secured = op.security.as_ref().is_some_and(|reqs| {
                    reqs.iter().any(|r| {
                        serde_json::to_value(r)
                            .is_ok_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
                    })
                });
                if secured {
                    add("401", "`unauthorized` or `token_expired`: missing, malformed, expired or revoked credentials");
                }
                let params = op.parameters.as_deref().unwrap_or_default();
                if params.iter().any(|p| p.parameter_in == ParameterIn::Path) {
                    add(
                        "400",
                        "`invalid_path_parameter`: a path segment has the wrong type",
                    );
                }
                if params.iter().any(|p| p.parameter_in == ParameterIn::Query) {
                    add(
                        "400",
                        "`invalid_query_parameter`: a query parameter has the wrong type",
                    );
                }
                if op.request_body.is_some() {
                    add("400", "`malformed_json` or `invalid_body`: the body is not JSON or could not be read");
                    add(
                        "413",
                        "`payload_too_large`: the body is over `MAX_BODY_BYTES`",
                    );
                    add(
                        "415",
                        "`unsupported_media_type`: the body is not of the declared content type",
                    );
                    if !openai {
                        add("422", "`invalid_body` or `validation_failed`: valid JSON of the wrong shape, or fields that break the rules (`details.fields`)");
                    }
                }
            }
        }
    }
}

const REDOC_JS: &[u8] = include_bytes!("../assets/redoc.standalone.js");

const REDOC_HTML: &str = r#"<!DOCTYPE html>
<html>
  <head>
    <title>Muse API · ReDoc</title>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
    <style>body { margin: 0; padding: 0; }</style>
  </head>
  <body>
    <div id="redoc-container"></div>
    <script src="/redoc/redoc.standalone.js"></script>
    <script>
      Redoc.init($spec, $config, document.getElementById("redoc-container"));
    </script>
  </body>
</html>"#;

async fn redoc_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/javascript; charset=utf-8")
        .insert_header(("cache-control", "public, max-age=86400"))
        .body(REDOC_JS)
}

async fn docs_redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header(("location", "/docs/"))
        .finish()
}

pub fn config(cfg: &mut web::ServiceConfig) {
    let spec = ApiDoc::openapi();
    cfg.service(web::resource("/docs").get(docs_redirect))
        .service(web::resource("/redoc/redoc.standalone.js").get(redoc_js))
        .service(Redoc::with_url("/redoc", spec.clone()).custom_html(REDOC_HTML))
        .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", spec));
}
