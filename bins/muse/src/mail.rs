//! The two [`Mailer`]s: SMTP through lettre when `SMTP_URL` is set, and an
//! outbox directory of `.eml` files for development.

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::{Message, SmtpTransport, Transport};
use muse_auth::{MailError, Mailer, OutgoingEmail};
use muse_core::Secret;

/// Writes each email to `DIR/<time>-<id>.eml`, so a developer can open the
/// links without a mail server.
#[derive(Debug, Clone)]
pub struct OutboxMailer {
    dir: PathBuf,
    from: String,
}

impl OutboxMailer {
    pub fn new(dir: PathBuf, from: &str) -> Self {
        Self {
            dir,
            from: from.to_string(),
        }
    }
}

impl Mailer for OutboxMailer {
    fn send(&self, email: &OutgoingEmail) -> Result<(), MailError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| MailError(format!("outbox {}: {e}", self.dir.display())))?;
        let now = chrono::Utc::now();
        let name = format!(
            "{}-{}.eml",
            now.format("%Y%m%dT%H%M%S%.3fZ"),
            uuid::Uuid::new_v4().simple()
        );
        let path = self.dir.join(name);
        let content = format!(
            "From: {}\nTo: {}\nSubject: {}\nDate: {}\nContent-Type: text/plain; charset=utf-8\n\n{}",
            self.from,
            email.to,
            email.subject,
            now.to_rfc2822(),
            email.body
        );
        std::fs::write(&path, content)
            .map_err(|e| MailError(format!("outbox {}: {e}", path.display())))?;
        tracing::info!(path = %path.display(), subject = %email.subject, "email written to the outbox");
        Ok(())
    }
}

/// Sends through an SMTP server: `smtp://user:pass@host:port` (add
/// `?tls=required` for STARTTLS) or `smtps://…` for TLS from the start.
pub struct SmtpMailer {
    transport: SmtpTransport,
    from: lettre::message::Mailbox,
}

impl std::fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("from", &self.from.to_string())
            .finish()
    }
}

impl SmtpMailer {
    pub fn new(url: &Secret<String>, from: &str) -> Result<Self, MailError> {
        let transport = SmtpTransport::from_url(url.expose())
            .map_err(|e| MailError(format!("SMTP_URL is not a valid SMTP URL: {e}")))?
            .timeout(Some(Duration::from_secs(15)))
            .build();
        let from = from
            .parse()
            .map_err(|e| MailError(format!("MAIL_FROM is not a valid address: {e}")))?;
        Ok(Self { transport, from })
    }
}

impl Mailer for SmtpMailer {
    fn send(&self, email: &OutgoingEmail) -> Result<(), MailError> {
        let to = email
            .to
            .parse()
            .map_err(|e| MailError(format!("bad recipient: {e}")))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(email.subject.clone())
            .header(ContentType::TEXT_PLAIN)
            .body(email.body.clone())
            .map_err(|e| MailError(format!("cannot build the message: {e}")))?;
        self.transport
            .send(&message)
            .map_err(|e| MailError(format!("SMTP: {e}")))?;
        tracing::info!(subject = %email.subject, "email sent over SMTP");
        Ok(())
    }
}
