use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use muse_persistence::testing::TestDb;
use muse_server::Config;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

pub const JWT_SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";
pub const PASSWORD: &str = "correct horse battery staple";

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    pub config: Config,
    /// The server's draining switch (what SIGTERM sets).
    pub draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _db: TestDb,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    /// Asserts the documented error shape and returns the code.
    pub fn error_code(&self) -> &str {
        let err = &self.body["error"];
        assert!(
            err.is_object(),
            "not an error body ({}): {}",
            self.status,
            self.text
        );
        assert!(
            err["message"].is_string(),
            "error without message: {}",
            self.text
        );
        err["code"].as_str().expect("error code")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(&[]).await
    }

    pub async fn spawn_with(overrides: &[(&str, &str)]) -> Self {
        let db = TestDb::new();
        let data_dir =
            std::env::temp_dir().join(format!("muse-e2e-{}", uuid::Uuid::new_v4().simple()));
        let mut vars: HashMap<String, String> = [
            ("MUSE_DATA_DIR", data_dir.to_str().unwrap()),
            ("DATABASE_URL", db.url.as_str()),
            ("JWT_SECRET", JWT_SECRET),
            ("BCRYPT_COST", "4"),
            ("WORKERS", "1"),
            ("DATABASE_POOL_SIZE", "4"),
            // Off unless a test turns it on (tests/api/rate_limits.rs).
            ("RATE_LIMIT_ENABLED", "false"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in overrides {
            vars.insert(k.to_string(), v.to_string());
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        vars.entry("PUBLIC_URL".into())
            .or_insert(format!("http://127.0.0.1:{port}"));
        let config = Config::from_vars(&vars).unwrap();
        let running = muse_server::server::start(config.clone(), listener)
            .await
            .unwrap();
        let draining = running.draining.clone();
        actix_web::rt::spawn(running.server);
        TestApp {
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            data_dir,
            config,
            draining,
            _db: db,
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        Self::read(req.send().await.unwrap()).await
    }

    pub async fn read(res: reqwest::Response) -> Resp {
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        self.call(Method::POST, path, token, Some(body)).await
    }

    pub async fn register(&self, email: &str, username: &str, password: &str) -> Resp {
        self.post(
            "/api/v1/auth/register",
            None,
            json!({"email": email, "username": username, "password": password}),
        )
        .await
    }

    pub async fn login(&self, email: &str, password: &str) -> Resp {
        self.post(
            "/api/v1/auth/login",
            None,
            json!({"email": email, "password": password}),
        )
        .await
    }

    /// Registers `name@example.com` and logs in; returns the login body.
    pub async fn user(&self, name: &str) -> Value {
        let email = format!("{name}@example.com");
        let r = self.register(&email, name, PASSWORD).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let r = self.login(&email, PASSWORD).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body
    }

    /// Emails written to the outbox, oldest first, as (to, body).
    pub fn outbox(&self) -> Vec<(String, String)> {
        let dir = self.data_dir.join("outbox");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let content = std::fs::read_to_string(p).unwrap();
                let to = content
                    .lines()
                    .find_map(|l| l.strip_prefix("To: "))
                    .unwrap_or_default()
                    .to_string();
                (to, content)
            })
            .collect()
    }

    /// Waits (bounded) for an email to `to` whose body has `?token=`, and returns the token.
    pub async fn wait_for_token(&self, to: &str, link_path: &str) -> String {
        for _ in 0..100 {
            if let Some(t) = self
                .outbox()
                .iter()
                .rev()
                .filter(|(t, _)| t == to)
                .find_map(|(_, body)| token_from(body, link_path))
            {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no email to {to} with a {link_path} link");
    }
}

/// Extracts the token of a `{link_path}?token=…` link.
pub fn token_from(body: &str, link_path: &str) -> Option<String> {
    let marker = format!("{link_path}?token=");
    let start = body.find(&marker)? + marker.len();
    Some(
        body[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect(),
    )
}

pub fn access(login: &Value) -> String {
    login["access_token"].as_str().unwrap().to_string()
}

pub fn refresh(login: &Value) -> String {
    login["refresh_token"].as_str().unwrap().to_string()
}

/// The access token of the admin that `ADMIN_EMAIL=root@example.com` and
/// `ADMIN_PASSWORD="an admin passphrase"` create at start.
pub async fn root_token(app: &TestApp) -> String {
    access(
        &app.login("root@example.com", "an admin passphrase")
            .await
            .body,
    )
}
