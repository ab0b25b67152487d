//! Stripe end to end against a local server speaking Stripe's HTTP API
//! (form-encoded POSTs, Idempotency-Key, bearer secret key), with webhook
//! payloads signed by the test: upgrade through Checkout, events applied
//! once and in order, bad or stale signatures refused without effect.

use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

type Seen = Arc<Mutex<Vec<(String, String, Vec<(String, String)>)>>>;

async fn stripe_api(
    req: HttpRequest,
    form: web::Form<Vec<(String, String)>>,
    seen: web::Data<Seen>,
) -> HttpResponse {
    if req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        != Some("Bearer sk_test_muse")
    {
        return HttpResponse::Unauthorized().json(json!({"error": {"message": "Invalid API Key provided", "type": "invalid_request_error"}}));
    }
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if key.is_empty() {
        return HttpResponse::BadRequest().json(
            json!({"error": {"message": "no idempotency key", "type": "invalid_request_error"}}),
        );
    }
    let path = req.path().to_string();
    seen.lock()
        .unwrap()
        .push((path.clone(), key, form.into_inner()));
    match path.as_str() {
        "/v1/customers" => HttpResponse::Ok().json(json!({"id": "cus_muse1", "object": "customer"})),
        "/v1/checkout/sessions" => HttpResponse::Ok().json(json!({"id": "cs_test_1", "object": "checkout.session", "url": "https://checkout.stripe.test/c/cs_test_1"})),
        p if p.starts_with("/v1/subscriptions/") => HttpResponse::Ok().json(json!({"id": p.trim_start_matches("/v1/subscriptions/"), "object": "subscription", "cancel_at_period_end": true})),
        _ => HttpResponse::NotFound().json(json!({"error": {"message": "Unrecognized request URL", "type": "invalid_request_error"}})),
    }
}

async fn fake_stripe() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let data = web::Data::new(seen.clone());
    let srv = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .default_service(web::post().to(stripe_api))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = srv.addrs()[0];
    actix_web::rt::spawn(srv.run());
    (format!("http://{addr}"), seen)
}

const SECRET: &str = "whsec_muse_test";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn deliver(app: &TestApp, event: &Value, signature: Option<String>) -> crate::helpers::Resp {
    let body = serde_json::to_vec(event).unwrap();
    let sig = signature.unwrap_or_else(|| muse_billing::stripe::sign(&body, SECRET, now()));
    let res = app
        .client
        .post(format!("{}/api/v1/subscription/webhook", app.base))
        .header("content-type", "application/json")
        .header("stripe-signature", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    TestApp::read(res).await
}

#[actix_web::test]
async fn a_user_subscribes_through_stripe_and_webhooks_apply_once_and_in_order() {
    let (stripe, seen) = fake_stripe().await;
    let app = TestApp::spawn_with(&[
        ("STRIPE_SECRET_KEY", "sk_test_muse"),
        ("STRIPE_WEBHOOK_SECRET", SECRET),
        ("STRIPE_API_BASE", &stripe),
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    let admin = root_token(&app).await;
    let token = access(&app.user("ivy").await);
    let ivy = app.get("/api/v1/auth/me", Some(&token)).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        app.get("/api/v1/subscription/info", Some(&token))
            .await
            .body["payments_enabled"],
        true
    );

    // A plan without a Stripe price cannot be bought; with one, Checkout starts.
    let r = app
        .post("/api/v1/subscription/upgrade/pro", Some(&token), json!({}))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "plan_not_purchasable")
    );
    app.call(reqwest::Method::PUT, "/api/v1/admin/plans/pro", Some(&admin), Some(json!({"name": "Pro", "price_cents": 1900, "stripe_price_id": "price_pro", "max_requests": 5000}))).await;
    let r = app
        .post("/api/v1/subscription/upgrade/pro", Some(&token), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["checkout_url"],
        "https://checkout.stripe.test/c/cs_test_1"
    );
    {
        let calls = seen.lock().unwrap();
        assert_eq!(
            calls.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
            ["/v1/customers", "/v1/checkout/sessions"]
        );
        assert_ne!(calls[0].1, calls[1].1, "one idempotency key per POST");
        let form: std::collections::HashMap<_, _> = calls[1].2.iter().cloned().collect();
        assert_eq!(
            (
                form["mode"].as_str(),
                form["customer"].as_str(),
                form["line_items[0][price]"].as_str()
            ),
            ("subscription", "cus_muse1", "price_pro")
        );
        assert_eq!(form["client_reference_id"], ivy);
    }
    assert_eq!(
        app.get("/api/v1/subscription/info", Some(&token))
            .await
            .body["plan"]["id"],
        "free",
        "nothing changes before Stripe confirms"
    );

    // Checkout completes: the plan changes, once.
    let t0 = now();
    let completed = json!({"id": "evt_checkout", "type": "checkout.session.completed", "created": t0,
        "data": {"object": {"id": "cs_test_1", "object": "checkout.session", "customer": "cus_muse1", "subscription": "sub_muse1",
                            "client_reference_id": ivy, "metadata": {"plan_id": "pro"}, "amount_total": 1900, "currency": "usd"}}});
    let r = deliver(&app, &completed, None).await;
    assert_eq!(
        (r.status, r.body["duplicate"].as_bool()),
        (StatusCode::OK, Some(false)),
        "{}",
        r.text
    );
    let r = deliver(&app, &completed, None).await;
    assert_eq!(r.body["duplicate"], true, "a retried event is applied once");
    let info = app.get("/api/v1/subscription/info", Some(&token)).await;
    assert_eq!(
        (
            info.body["plan"]["id"].as_str(),
            info.body["subscription"]["status"].as_str()
        ),
        (Some("pro"), Some("active"))
    );

    // Bad, stale or missing signatures: 400 and nothing changes.
    let evil = json!({"id": "evt_evil", "type": "customer.subscription.deleted", "created": t0 + 50,
        "data": {"object": {"id": "sub_muse1", "customer": "cus_muse1", "status": "canceled", "metadata": {"user_id": ivy}}}});
    let body = serde_json::to_vec(&evil).unwrap();
    for sig in [
        Some(muse_billing::stripe::sign(&body, "whsec_wrong", now())),
        Some(muse_billing::stripe::sign(&body, SECRET, now() - 400)),
        Some("t=1,v1=zz".to_string()),
        Some(String::new()),
    ] {
        let r = deliver(&app, &evil, sig).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::BAD_REQUEST, "invalid_signature")
        );
    }
    // A signature over another body does not carry over (replayed header).
    let other = json!({"id": "evt_other", "type": "ping", "created": t0});
    let replayed = muse_billing::stripe::sign(&serde_json::to_vec(&other).unwrap(), SECRET, now());
    assert_eq!(
        deliver(&app, &evil, Some(replayed)).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.get("/api/v1/subscription/info", Some(&token))
            .await
            .body["plan"]["id"],
        "pro"
    );

    // Updates in order; an older one delivered late is ignored.
    let updated = |id: &str, created: i64, cancel: bool| {
        json!({"id": id, "type": "customer.subscription.updated", "created": created,
        "data": {"object": {"id": "sub_muse1", "object": "subscription", "customer": "cus_muse1", "status": "active", "cancel_at_period_end": cancel,
                            "current_period_end": t0 + 30 * 86_400, "items": {"data": [{"price": {"id": "price_pro"}}]}, "metadata": {"user_id": ivy}}}})
    };
    assert_eq!(
        deliver(&app, &updated("evt_new", t0 + 20, true), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        deliver(&app, &updated("evt_old", t0 + 10, false), None)
            .await
            .status,
        StatusCode::OK
    );
    let sub = app
        .get("/api/v1/subscription/info", Some(&token))
        .await
        .body["subscription"]
        .clone();
    assert_eq!(
        sub["cancel_at_period_end"], true,
        "the late, older event did not win: {sub}"
    );
    assert!(sub["current_period_end"].is_string());

    // Invoices land in the history; a failed payment makes the subscription past due.
    let invoice = |id: &str, kind: &str, created: i64| {
        json!({"id": id, "type": kind, "created": created,
        "data": {"object": {"id": format!("in_{id}"), "object": "invoice", "customer": "cus_muse1", "amount_paid": 1900, "amount_due": 1900, "currency": "usd"}}})
    };
    deliver(&app, &invoice("evt_paid", "invoice.paid", t0 + 30), None).await;
    deliver(
        &app,
        &invoice("evt_failed", "invoice.payment_failed", t0 + 40),
        None,
    )
    .await;
    assert_eq!(
        app.get("/api/v1/subscription/info", Some(&token))
            .await
            .body["subscription"]["status"],
        "past_due"
    );
    let h = app
        .get("/api/v1/subscription/billing/history", Some(&token))
        .await;
    let kinds: Vec<&str> = h.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["invoice_payment_failed", "invoice_paid", "plan_changed"],
        "{}",
        h.text
    );
    assert_eq!(h.body["items"][1]["amount_cents"], 1900);

    // Cancelling goes to Stripe first; its deletion event ends the plan.
    let r = app
        .post("/api/v1/subscription/cancel", Some(&token), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .any(|c| c.0 == "/v1/subscriptions/sub_muse1"
            && c.2
                .contains(&("cancel_at_period_end".into(), "true".into()))));
    let deleted = json!({"id": "evt_deleted", "type": "customer.subscription.deleted", "created": t0 + 60,
        "data": {"object": {"id": "sub_muse1", "customer": "cus_muse1", "status": "canceled", "metadata": {"user_id": ivy}}}});
    assert_eq!(deliver(&app, &deleted, None).await.status, StatusCode::OK);
    assert_eq!(
        app.get("/api/v1/subscription/info", Some(&token))
            .await
            .body["plan"]["id"],
        "free"
    );
    // The audit log has every change, and who made it.
    let audit = app
        .get(
            "/api/v1/admin/audit?event=subscription.changed&per_page=100",
            Some(&admin),
        )
        .await;
    assert_eq!(audit.status, StatusCode::OK, "{}", audit.text);
    let by: Vec<&str> = audit.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == ivy.as_str())
        .map(|e| e["detail"]["by"].as_str().unwrap_or_default())
        .collect();
    assert!(
        by.contains(&"stripe") && by.contains(&"user"),
        "{}",
        audit.text
    );
}

#[actix_web::test]
async fn without_stripe_the_payment_endpoints_say_so() {
    let app = TestApp::spawn().await;
    let token = access(&app.user("nopay").await);
    let r = deliver(&app, &json!({"id": "evt_1", "type": "invoice.paid"}), None).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "payments_not_configured")
    );
    let r = app
        .post("/api/v1/subscription/upgrade/pro", Some(&token), json!({}))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "payments_not_configured")
    );
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("administrator"));
}
