//! Input rules for accounts: email, username, password, API key names.

use crate::common_passwords::COMMON_PASSWORDS;
use crate::error::FieldError;

pub const PASSWORD_MIN_CHARS: usize = 8;
pub const PASSWORD_MAX_CHARS: usize = 128;
pub const USERNAME_MIN_CHARS: usize = 3;
pub const USERNAME_MAX_CHARS: usize = 32;
pub const EMAIL_MAX_BYTES: usize = 254;
pub const API_KEY_NAME_MAX_CHARS: usize = 64;

/// Normalises an email (trim, lowercase) and checks its shape: one `@`, a
/// local part of 1..=64 bytes without spaces or control characters, and a
/// domain of dot-separated labels (letters, digits, hyphens) with at least
/// one dot.
pub fn normalize_email(raw: &str) -> Result<String, FieldError> {
    let email = raw.trim().to_lowercase();
    let invalid = || FieldError::new("email", "invalid", "must be a valid email address");
    if email.is_empty() {
        return Err(FieldError::new("email", "required", "email is required"));
    }
    if email.len() > EMAIL_MAX_BYTES {
        return Err(FieldError::new(
            "email",
            "too_long",
            format!("must be at most {EMAIL_MAX_BYTES} bytes"),
        ));
    }
    let (local, domain) = email.split_once('@').ok_or_else(invalid)?;
    if local.is_empty()
        || local.len() > 64
        || domain.contains('@')
        || local.starts_with('.')
        || local.ends_with('.')
        || local.contains("..")
        || local
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "()<>[]\\,;:\"".contains(c))
    {
        return Err(invalid());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2
        || labels.iter().any(|l| {
            l.is_empty()
                || l.len() > 63
                || l.starts_with('-')
                || l.ends_with('-')
                || !l.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
    {
        return Err(invalid());
    }
    // One canonical form per domain: internationalised domains are stored
    // as IDNA ASCII (punycode, UTS #46), so a look-alike domain
    // (`exаmple.com` with a Cyrillic `а`) reads `xn--exmple-4uf.com` to an
    // admin instead of passing for `example.com`.
    if domain.is_ascii() {
        return Ok(email);
    }
    let ascii = idna::domain_to_ascii_strict(domain).map_err(|_| invalid())?;
    Ok(format!("{local}@{ascii}"))
}

/// The form emails with an internationalised domain were stored in before
/// they were canonicalised (lowercase Unicode): looked up when the
/// canonical form finds nothing, so older accounts keep working.
pub fn legacy_email(raw: &str) -> Option<String> {
    let email = raw.trim().to_lowercase();
    let (_, domain) = email.split_once('@')?;
    (!domain.is_ascii()).then_some(email)
}

/// Usernames: 3 to 32 characters, ASCII letters, digits, `_`, `-` and `.`,
/// starting with a letter or digit. Case-insensitive: stored lowercase.
pub fn normalize_username(raw: &str) -> Result<String, FieldError> {
    let name = raw.trim().to_ascii_lowercase();
    let len = name.chars().count();
    if !(USERNAME_MIN_CHARS..=USERNAME_MAX_CHARS).contains(&len) {
        return Err(FieldError::new(
            "username",
            "invalid_length",
            format!("must be {USERNAME_MIN_CHARS} to {USERNAME_MAX_CHARS} characters"),
        ));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(FieldError::new(
            "username",
            "invalid_characters",
            "may contain only letters, digits, '_', '-' and '.', and must start with a letter or digit",
        ));
    }
    Ok(name)
}

/// Passwords: 8 to 128 characters, any characters, no composition rules;
/// refused when on the common-passwords list or equal to the email, its
/// local part, or the username.
pub fn check_password(
    field: &str,
    password: &str,
    email: Option<&str>,
    username: Option<&str>,
) -> Result<(), FieldError> {
    let len = password.chars().count();
    if len < PASSWORD_MIN_CHARS {
        return Err(FieldError::new(
            field,
            "too_short",
            format!("must be at least {PASSWORD_MIN_CHARS} characters"),
        ));
    }
    if len > PASSWORD_MAX_CHARS {
        return Err(FieldError::new(
            field,
            "too_long",
            format!("must be at most {PASSWORD_MAX_CHARS} characters"),
        ));
    }
    let lower = password.to_lowercase();
    if COMMON_PASSWORDS.binary_search(&lower.as_str()).is_ok() {
        return Err(FieldError::new(
            field,
            "too_common",
            "this password is too common; choose another one",
        ));
    }
    let local = email.and_then(|e| e.split('@').next());
    if [email, local, username]
        .into_iter()
        .flatten()
        .any(|s| !s.is_empty() && s.eq_ignore_ascii_case(password.trim()))
    {
        return Err(FieldError::new(
            field,
            "matches_identity",
            "must not be your email or username",
        ));
    }
    Ok(())
}

/// API key names: 1 to 64 characters after trimming, no control characters.
pub fn check_api_key_name(raw: &str) -> Result<String, FieldError> {
    let name = raw.trim().to_string();
    let len = name.chars().count();
    if len == 0 || len > API_KEY_NAME_MAX_CHARS {
        return Err(FieldError::new(
            "name",
            "invalid_length",
            format!("must be 1 to {API_KEY_NAME_MAX_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(FieldError::new(
            "name",
            "invalid_characters",
            "must not contain control characters",
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_list_is_sorted_for_binary_search() {
        assert!(COMMON_PASSWORDS.windows(2).all(|w| w[0] < w[1]));
        assert!(COMMON_PASSWORDS
            .iter()
            .all(|p| p.len() >= PASSWORD_MIN_CHARS));
    }

    #[test]
    fn emails() {
        assert_eq!(
            normalize_email("  Ada@Example.COM ").unwrap(),
            "ada@example.com"
        );
        assert_eq!(
            normalize_email("a.b+tag@sub.example.io").unwrap(),
            "a.b+tag@sub.example.io"
        );
        assert_eq!(
            normalize_email("Ana@Bücher.Example").unwrap(),
            "ana@xn--bcher-kva.example",
            "internationalised domains in IDNA ASCII"
        );
        assert_ne!(
            normalize_email("ana@exаmple.com").unwrap(),
            "ana@example.com",
            "a Cyrillic look-alike is another domain, and reads as one"
        );
        assert_eq!(
            normalize_email("ana@exаmple.com").unwrap(),
            normalize_email("ANA@EXАMPLE.COM").unwrap(),
            "one canonical form"
        );
        assert_eq!(
            legacy_email("Ana@Bücher.example").as_deref(),
            Some("ana@bücher.example")
        );
        assert_eq!(legacy_email("ana@example.com"), None);
        assert_eq!(
            normalize_email("a.b+tag@sub.example.io").unwrap(),
            "a.b+tag@sub.example.io"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "ada@@example.com",
            "a da@example.com",
            "ada@exa_mple.com",
            "ada@-example.com",
            "ada.@example.com",
            "ada@example..com",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(
            normalize_email(&format!("{}@example.com", "a".repeat(250)))
                .unwrap_err()
                .code,
            "too_long"
        );
    }

    #[test]
    fn usernames() {
        assert_eq!(normalize_username("Ada_L.dev").unwrap(), "ada_l.dev");
        for bad in ["ab", "_ada", "ada lovelace", "ada!", &"a".repeat(33), "adà"] {
            assert!(normalize_username(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn passwords() {
        assert!(check_password("password", "correct horse battery", None, None).is_ok());
        assert!(check_password("password", "ünïcödé-pässwörd", None, None).is_ok());
        assert_eq!(
            check_password("password", "short", None, None)
                .unwrap_err()
                .code,
            "too_short"
        );
        assert_eq!(
            check_password("password", &"x".repeat(129), None, None)
                .unwrap_err()
                .code,
            "too_long"
        );
        assert!(check_password("password", &"x".repeat(128), None, None).is_ok());
        assert_eq!(
            check_password("password", "Password123", None, None)
                .unwrap_err()
                .code,
            "too_common"
        );
        assert_eq!(
            check_password(
                "password",
                "adalovelace",
                Some("adalovelace@example.com"),
                None
            )
            .unwrap_err()
            .code,
            "matches_identity"
        );
        assert_eq!(
            check_password("password", "ada_the_dev", None, Some("ada_the_dev"))
                .unwrap_err()
                .code,
            "matches_identity"
        );
    }

    #[test]
    fn key_names() {
        assert_eq!(check_api_key_name("  ci  ").unwrap(), "ci");
        assert!(check_api_key_name("").is_err());
        assert!(check_api_key_name("a\u{0}b").is_err());
        assert!(check_api_key_name(&"k".repeat(65)).is_err());
    }
}
