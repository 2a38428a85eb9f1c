//! Quota scopes: the names the store counts under.

use std::fmt;
use std::sync::Arc;

/// What a send is charged to: one grant, or one sending domain (and, for a client with a
/// profile of its own, that client too). The store treats it as
/// an opaque name; every key of one scope shares its Redis hash tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope(Arc<str>);

impl Scope {
    /// The scope of a canonical grant id.
    pub fn grant(id: &str) -> Self {
        Scope(format!("grant:{id}").into())
    }

    /// The scope of a sending domain, by its [`canonical_domain`] form, so that
    /// `Example.com.` and ` example.com` share the quota of `example.com`.
    pub fn domain(domain: &str) -> Self {
        Scope(format!("domain:{}", canonical_domain(domain)).into())
    }

    /// The scope of a configured client's own quota (`[[clients]] profile`); client names
    /// never contain `:`, so it cannot be mistaken for a grant's or a domain's.
    pub fn client(name: &str) -> Self {
        Scope(format!("client:{name}").into())
    }

    /// The store's name for it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A sending domain as one quota counts it: surrounding whitespace and trailing dots
/// (the DNS root) dropped, ASCII letters lowercased. Empty when nothing is left.
pub fn canonical_domain(domain: &str) -> String {
    domain
        .trim()
        .trim_end_matches(|c: char| c == '.' || c.is_whitespace())
        .to_ascii_lowercase()
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

    #[test]
    fn spellings_of_one_domain_share_a_scope() {
        for spelling in [
            "example.com",
            "Example.com.",
            " example.com",
            "EXAMPLE.COM \t",
            "\texample.com. ",
            "example.com..",
            "example.com .",
        ] {
            assert_eq!(
                Scope::domain(spelling).as_str(),
                "domain:example.com",
                "{spelling:?}"
            );
        }
        assert_ne!(Scope::domain("example.com"), Scope::domain("example.co"));
        assert_eq!(canonical_domain(" . "), "");
    }
}
