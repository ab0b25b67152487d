use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn verify_email_through_the_outbox_link() {
    let app = TestApp::spawn().await;
    let token = access(&app.user("sam").await);
    let link = app.wait_for_token("sam@example.com", "/verify-email").await;
    let (_, body) = app.outbox().into_iter().next().unwrap();
    assert!(
        body.contains(&format!("{}/verify-email?token=", app.base)),
        "{body}"
    );

    let r = app
        .post(
            &format!("/api/v1/auth/verify-email/{link}"),
            None,
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let me = app.get("/api/v1/auth/me", Some(&token)).await;
    assert_eq!(me.body["email_verified"], true);
    assert!(me.body["email_verified_at"].is_string());
    let again = app
        .post(
            &format!("/api/v1/auth/verify-email/{link}"),
            None,
            json!({}),
        )
        .await;
    assert_eq!(
        (again.status, again.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_token")
    );
    let r = app
        .post("/api/v1/auth/resend-verification", Some(&token), json!({}))
        .await;
    assert_eq!(
        (r.status, r.body["message"].as_str()),
        (StatusCode::ACCEPTED, Some("email already verified"))
    );

    // The page behind the link exists and does not echo the token.
    let page = app
        .client
        .get(format!("{}/verify-email?token={link}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(!page.text().await.unwrap().contains(&link));
}

#[actix_web::test]
async fn password_reset_through_the_outbox_link() {
    let app = TestApp::spawn().await;
    let old_session = app.user("tia").await;
    let other_device = app.login("tia@example.com", PASSWORD).await.body;

    let known = app
        .post(
            "/api/v1/auth/forgot-password",
            None,
            json!({"email": "TIA@example.com"}),
        )
        .await;
    let unknown = app
        .post(
            "/api/v1/auth/forgot-password",
            None,
            json!({"email": "ghost@example.com"}),
        )
        .await;
    let invalid = app
        .post(
            "/api/v1/auth/forgot-password",
            None,
            json!({"email": "not an email"}),
        )
        .await;
    assert_eq!(known.status, StatusCode::ACCEPTED);
    assert_eq!((known.status, &known.text), (unknown.status, &unknown.text));
    assert_eq!((known.status, &known.text), (invalid.status, &invalid.text));

    let token = app
        .wait_for_token("tia@example.com", "/reset-password")
        .await;
    assert!(app.outbox().iter().all(|(to, _)| to != "ghost@example.com"));
    let page = app
        .client
        .get(format!("{}/reset-password?token={token}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));

    let weak = app
        .post(
            "/api/v1/auth/reset-password",
            None,
            json!({"token": token, "new_password": "short"}),
        )
        .await;
    assert_eq!(weak.status, StatusCode::UNPROCESSABLE_ENTITY);
    let new_password = "a brand new passphrase";
    let r = app
        .post(
            "/api/v1/auth/reset-password",
            None,
            json!({"token": token, "new_password": new_password}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // Every session ended; the old password is gone; the link is spent.
    for s in [&old_session, &other_device] {
        assert_eq!(
            app.get("/api/v1/auth/me", Some(&access(s))).await.status,
            StatusCode::UNAUTHORIZED
        );
        let r = app
            .post(
                "/api/v1/auth/refresh",
                None,
                json!({"refresh_token": refresh(s)}),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        app.login("tia@example.com", PASSWORD).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.login("tia@example.com", new_password).await.status,
        StatusCode::OK
    );
    let reuse = app
        .post(
            "/api/v1/auth/reset-password",
            None,
            json!({"token": token, "new_password": "yet another passphrase"}),
        )
        .await;
    assert_eq!(
        (reuse.status, reuse.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_token")
    );
    let bogus = app
        .post(
            "/api/v1/auth/reset-password",
            None,
            json!({"token": "bogus", "new_password": "yet another passphrase"}),
        )
        .await;
    assert_eq!(bogus.status, StatusCode::BAD_REQUEST);
}

/// A minimal SMTP server on 127.0.0.1 that records each message's DATA.
struct SmtpSink {
    port: u16,
    messages: Arc<Mutex<Vec<String>>>,
}

impl SmtpSink {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let store = messages.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(20) {
                let Ok(stream) = stream else { continue };
                stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut out = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let _ = out.write_all(b"220 sink ESMTP ready\r\n");
                let mut in_data = false;
                let mut data = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if in_data {
                        if line == ".\r\n" {
                            in_data = false;
                            store.lock().unwrap().push(std::mem::take(&mut data));
                            let _ = out.write_all(b"250 2.0.0 queued\r\n");
                        } else {
                            data.push_str(&line);
                        }
                        continue;
                    }
                    let cmd = line.to_ascii_uppercase();
                    let reply: &[u8] = if cmd.starts_with("EHLO") {
                        b"250-sink\r\n250 8BITMIME\r\n"
                    } else if cmd.starts_with("DATA") {
                        in_data = true;
                        b"354 end with <CRLF>.<CRLF>\r\n"
                    } else if cmd.starts_with("QUIT") {
                        let _ = out.write_all(b"221 bye\r\n");
                        break;
                    } else {
                        b"250 OK\r\n"
                    };
                    let _ = out.write_all(reply);
                }
            }
        });
        Self { port, messages }
    }
}

#[actix_web::test]
async fn smtp_mailer_delivers_to_a_real_smtp_server() {
    let sink = SmtpSink::start();
    let url = format!("smtp://127.0.0.1:{}", sink.port);
    let app =
        TestApp::spawn_with(&[("SMTP_URL", &url), ("MAIL_FROM", "Muse <muse@example.com>")]).await;
    let info = app.get("/api/v1/info", None).await;
    assert_eq!(info.body["mail"], "smtp");

    app.user("uma").await;
    app.post(
        "/api/v1/auth/forgot-password",
        None,
        json!({"email": "uma@example.com"}),
    )
    .await;
    let mut token = None;
    for _ in 0..100 {
        let msgs = sink.messages.lock().unwrap().clone();
        // Quoted-printable may fold long lines: undo soft breaks first.
        if let Some(t) = msgs
            .iter()
            .map(|m| m.replace("=\r\n", "").replace("=3D", "="))
            .find_map(|m| token_from(&m, "/reset-password"))
        {
            token = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = token.expect("reset email delivered over SMTP");
    let msgs = sink.messages.lock().unwrap().clone();
    assert!(msgs
        .iter()
        .any(|m| m.contains("To: uma@example.com") && m.contains("From: Muse <muse@example.com>")));
    assert!(
        !app.data_dir.join("outbox").exists(),
        "nothing written to the outbox"
    );
    let r = app
        .post(
            "/api/v1/auth/reset-password",
            None,
            json!({"token": token, "new_password": "smtp delivered passphrase"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[actix_web::test]
async fn mail_failures_do_not_break_registration_or_reveal_accounts() {
    // Nothing listens on port 1.
    let app = TestApp::spawn_with(&[("SMTP_URL", "smtp://127.0.0.1:1")]).await;
    let r = app.register("vic@example.com", "vic", PASSWORD).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let a = app
        .post(
            "/api/v1/auth/forgot-password",
            None,
            json!({"email": "vic@example.com"}),
        )
        .await;
    let b = app
        .post(
            "/api/v1/auth/forgot-password",
            None,
            json!({"email": "nobody@example.com"}),
        )
        .await;
    assert_eq!((a.status, a.text), (b.status, b.text));
}
