//! Payments: the [`PaymentGateway`] port, its Stripe implementation
//! (Stripe's HTTP API: form-encoded bodies, an `Idempotency-Key` on every
//! POST, the secret key as a bearer token), and webhook signature
//! verification.

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

/// How old a webhook signature may be.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("the payment provider refused the request: {0}")]
    Refused(String),
    #[error("cannot reach the payment provider: {0}")]
    Unavailable(String),
}

/// A hosted checkout page the user is sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    pub url: String,
}

/// What Muse asks of a payment provider.
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    /// Creates a customer for a user; returns its id.
    async fn create_customer(&self, user_id: Uuid, email: &str) -> Result<String, PaymentError>;
    /// A checkout session subscribing `customer` to `price_id`.
    async fn create_checkout(
        &self,
        customer: &str,
        price_id: &str,
        user_id: Uuid,
        plan_id: &str,
        success_url: &str,
        cancel_url: &str,
    ) -> Result<CheckoutSession, PaymentError>;
    /// Ends a subscription at the end of its current period.
    async fn cancel_at_period_end(&self, subscription_id: &str) -> Result<(), PaymentError>;
}

/// Stripe over its HTTP API.
pub struct StripeGateway {
    http: reqwest::Client,
    base_url: String,
    secret_key: String,
}

impl StripeGateway {
    /// `base_url` is `https://api.stripe.com` in production.
    pub fn new(secret_key: &str, base_url: &str) -> Result<Self, PaymentError> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(20))
            .build()
            .map_err(|e| PaymentError::Unavailable(e.to_string()))?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            secret_key: secret_key.to_string(),
        })
    }

    async fn post(
        &self,
        path: &str,
        form: &[(&str, String)],
    ) -> Result<serde_json::Value, PaymentError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(&self.secret_key)
            .header("Idempotency-Key", Uuid::new_v4().to_string())
            .form(form)
            .send()
            .await
            .map_err(|e| PaymentError::Unavailable(e.without_url().to_string()))?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| PaymentError::Unavailable(e.without_url().to_string()))?;
        if !status.is_success() {
            let message = body["error"]["message"]
                .as_str()
                .unwrap_or("unknown error")
                .to_string();
            return Err(if status.is_server_error() {
                PaymentError::Unavailable(message)
            } else {
                PaymentError::Refused(message)
            });
        }
        Ok(body)
    }
}

fn field(v: &serde_json::Value, name: &str) -> Result<String, PaymentError> {
    v[name]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| PaymentError::Unavailable(format!("Stripe's answer has no {name}")))
}

#[async_trait]
impl PaymentGateway for StripeGateway {
    async fn create_customer(&self, user_id: Uuid, email: &str) -> Result<String, PaymentError> {
        let v = self
            .post(
                "/v1/customers",
                &[
                    ("email", email.to_string()),
                    ("metadata[user_id]", user_id.to_string()),
                ],
            )
            .await?;
        field(&v, "id")
    }

    async fn create_checkout(
        &self,
        customer: &str,
        price_id: &str,
        user_id: Uuid,
        plan_id: &str,
        success_url: &str,
        cancel_url: &str,
    ) -> Result<CheckoutSession, PaymentError> {
        let v = self
            .post(
                "/v1/checkout/sessions",
                &[
                    ("mode", "subscription".into()),
                    ("customer", customer.into()),
                    ("line_items[0][price]", price_id.into()),
                    ("line_items[0][quantity]", "1".into()),
                    ("client_reference_id", user_id.to_string()),
                    ("metadata[plan_id]", plan_id.into()),
                    ("subscription_data[metadata][user_id]", user_id.to_string()),
                    ("subscription_data[metadata][plan_id]", plan_id.into()),
                    ("success_url", success_url.into()),
                    ("cancel_url", cancel_url.into()),
                ],
            )
            .await?;
        Ok(CheckoutSession {
            id: field(&v, "id")?,
            url: field(&v, "url")?,
        })
    }

    async fn cancel_at_period_end(&self, subscription_id: &str) -> Result<(), PaymentError> {
        if subscription_id.is_empty()
            || !subscription_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(PaymentError::Refused("bad subscription id".into()));
        }
        self.post(
            &format!("/v1/subscriptions/{subscription_id}"),
            &[("cancel_at_period_end", "true".into())],
        )
        .await
        .map(|_| ())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing or malformed Stripe-Signature header")]
    Malformed,
    #[error("the signature timestamp is outside the tolerance")]
    Stale,
    #[error("no signature matches")]
    Mismatch,
}

/// Verifies a `Stripe-Signature` header (`t=…,v1=…[,v1=…]`) over the raw
/// body: HMAC-SHA256 of `"{t}.{payload}"` with the endpoint secret, any
/// `v1` may match (compared in constant time), and `t` within
/// [`SIGNATURE_TOLERANCE_SECS`] of `now_secs`.
pub fn verify_signature(
    payload: &[u8],
    header: &str,
    secret: &str,
    now_secs: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", s)) => {
                signatures.push(hex::decode(s).map_err(|_| SignatureError::Malformed)?)
            }
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now_secs - t).abs() > SIGNATURE_TOLERANCE_SECS {
        return Err(SignatureError::Stale);
    }
    for sig in signatures {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .map_err(|_| SignatureError::Malformed)?;
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        if mac.verify_slice(&sig).is_ok() {
            return Ok(());
        }
    }
    Err(SignatureError::Mismatch)
}

/// Signs a payload as Stripe does (tests, and tools that replay events).
pub fn sign(payload: &[u8], secret: &str, t: i64) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked_over_the_raw_body_with_a_tolerance() {
        let body = br#"{"id":"evt_1","type":"invoice.paid"}"#;
        let header = sign(body, "whsec_test", 1_000_000);
        assert_eq!(
            verify_signature(body, &header, "whsec_test", 1_000_100),
            Ok(())
        );
        assert_eq!(
            verify_signature(body, &header, "whsec_other", 1_000_100),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(b"{}", &header, "whsec_test", 1_000_100),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(body, &header, "whsec_test", 1_000_301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify_signature(body, "t=1,v0=ab", "whsec_test", 1),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify_signature(body, "garbage", "whsec_test", 1),
            Err(SignatureError::Malformed)
        );
        // Several v1 values (secret rotation): any may match.
        let good = header.split_once("v1=").unwrap().1.to_string();
        let two = format!("t=1000000,v1={},v1={good}", "00".repeat(32));
        assert_eq!(
            verify_signature(body, &two, "whsec_test", 1_000_000),
            Ok(())
        );
    }
}
