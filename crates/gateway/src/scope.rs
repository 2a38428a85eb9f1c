//! Quota scopes: the names the store counts under.

use std::fmt;
use std::sync::Arc;

/// What a send is charged to: one grant, or one sending domain. The store treats it as
/// an opaque name; every key of one scope shares its Redis hash tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope(Arc<str>);

impl Scope {
    /// The scope of a canonical grant id.
    pub fn grant(id: &str) -> Self {
        Scope(format!("grant:{id}").into())
    }

    /// The scope of a sending domain (compared ASCII case-insensitively).
    pub fn domain(domain: &str) -> Self {
        Scope(format!("domain:{}", domain.to_ascii_lowercase()).into())
    }

    /// The store's name for it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_and_domains_never_share_a_scope() {
        assert_eq!(Scope::grant("abc").as_str(), "grant:abc");
        assert_eq!(
            Scope::domain("Mail.Example").as_str(),
            "domain:mail.example"
        );
        assert_ne!(Scope::grant("x"), Scope::domain("x"));
    }
}
