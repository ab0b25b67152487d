//! The outgoing-mail port.

/// A plain-text email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingEmail {
    pub to: String,
    pub subject: String,
    pub body: String,
}

#[derive(Debug, thiserror::Error)]
#[error("could not send email: {0}")]
pub struct MailError(pub String);

/// Sends email. Blocking.
pub trait Mailer: Send + Sync + 'static {
    fn send(&self, email: &OutgoingEmail) -> Result<(), MailError>;
}
