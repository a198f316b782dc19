//! Who may call the admin API, and for what.
//!
//! Operators present a client certificate (on an admin listener with TLS
//! and a client CA: its subject's common name maps to a role and an
//! operator) or a bearer token (`authorization: Bearer TOKEN`). Only
//! the token's SHA-256 is configured, each with a role and the operator
//! identity that audit records name; a presented token is hashed and
//! compared with every configured hash in constant time. `read` allows the
//! read-outs, `write` everything. With no credentials configured the admin
//! API refuses every call.
//!
//! A refusal says only what the caller lacks (UNAUTHENTICATED: no or an
//! unknown token; PERMISSION_DENIED: a token whose role does not allow the
//! call). It is decided before the request is looked at, so it changes
//! nothing and tells nothing about accounts; the token itself is never
//! logged or echoed.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::engine::record::hex;

/// What a credential allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read-outs only.
    Read,
    /// Read-outs and changes.
    Write,
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            other => Err(format!("expected read or write, got {other:?}")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
        })
    }
}

/// One configured token: its hash, role and operator.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
    /// What it allows.
    pub role: Role,
    /// Who it is, as audit records name them.
    pub operator: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A hash is not the secret, but it has no business in logs either.
        f.debug_struct("Token")
            .field("role", &self.role)
            .field("operator", &self.operator)
            .finish_non_exhaustive()
    }
}

/// A caller the admin API knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Their identity, for audit records.
    pub operator: String,
    /// What they may do.
    pub role: Role,
}

/// The operator a client certificate stands for, by a name in it (the
/// certificate itself is verified by TLS against the admin listener's
/// client CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRule {
    /// The name it is known by.
    pub name: CertificateName,
    /// What it allows.
    pub role: Role,
    /// Who it is, as audit records name them.
    pub operator: String,
}

/// A name a client certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateName {
    /// The subject's common name, when the subject has exactly one.
    CommonName(String),
    /// A DNS name among its subject alternative names.
    Dns(String),
    /// A URI among its subject alternative names: a SPIFFE id
    /// (`spiffe://trust-domain/path`) in a service mesh.
    Uri(String),
}

impl std::fmt::Display for CertificateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertificateName::CommonName(n) => write!(f, "CN={n}"),
            CertificateName::Dns(n) => write!(f, "DNS:{n}"),
            CertificateName::Uri(n) => write!(f, "URI:{n}"),
        }
    }
}

/// The operators the admin API knows: credentials, roles, identities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operators {
    tokens: Vec<Token>,
    certificates: Vec<CertificateRule>,
}

impl Operators {
    /// The operators `tokens` identify.
    pub fn new(tokens: Vec<Token>) -> Operators {
        Operators {
            tokens,
            certificates: Vec::new(),
        }
    }

    /// These operators, and those client certificates stand for.
    pub fn with_certificates(mut self, certificates: Vec<CertificateRule>) -> Operators {
        self.certificates = certificates;
        self
    }

    /// Adds `tokens`.
    pub fn extend(&mut self, tokens: Vec<Token>) {
        self.tokens.extend(tokens);
    }

    /// None configured: every admin call is refused.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.certificates.is_empty()
    }

    /// The operator the verified client certificate of `request` stands
    /// for, if it presented one that a rule names.
    ///
    /// Only a certificate issued for clients counts: one whose extended key
    /// usage names clientAuth (one without the extension, good for any
    /// use, is not taken as an operator's). A common name counts only
    /// when the subject has exactly one, so which of several was meant is
    /// never guessed.
    fn certificate<T>(&self, request: &Request<T>) -> Option<Principal> {
        use x509_parser::extensions::GeneralName;
        if self.certificates.is_empty() {
            return None;
        }
        let certs = request.peer_certs()?;
        let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
        if !cert.extended_key_usage().ok()??.value.client_auth {
            return None;
        }
        let mut common_names = cert.subject().iter_common_name().map(|n| n.as_str());
        let common_name = match (common_names.next(), common_names.next()) {
            (Some(Ok(name)), None) => Some(name),
            _ => None,
        };
        let alternatives = cert.subject_alternative_name().ok().flatten();
        let alternatives = alternatives.as_ref().map_or(&[][..], |a| &a.value.general_names[..]);
        let names = |rule: &&CertificateRule| match &rule.name {
            CertificateName::CommonName(n) => common_name == Some(n.as_str()),
            CertificateName::Dns(n) => alternatives
                .iter()
                .any(|g| matches!(g, GeneralName::DNSName(d) if d.eq_ignore_ascii_case(n))),
            CertificateName::Uri(n) => alternatives.iter().any(|g| matches!(g, GeneralName::URI(u) if u == n)),
        };
        self.certificates.iter().find(names).map(|rule| Principal {
            operator: rule.operator.clone(),
            role: rule.role,
        })
    }

    /// The principal a presented `token` belongs to. Every configured hash
    /// is compared, in constant time, whichever matches.
    pub fn authenticate(&self, token: &[u8]) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.sha256.ct_eq(&digest)) && found.is_none() {
                found = Some(Principal {
                    operator: t.operator.clone(),
                    role: t.role,
                });
            }
        }
        found
    }

    /// The caller of `request`, if allowed `needed`; the refusal otherwise.
    pub fn authorize<T>(&self, request: &Request<T>, needed: Role) -> Result<Principal, Status> {
        if let Some(principal) = self.certificate(request) {
            return allowed(principal, needed);
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let Some(token) = presented.filter(|t| !t.is_empty()) else {
            return Err(Status::unauthenticated(
                "the admin API needs a bearer token (authorization: Bearer TOKEN)",
            ));
        };
        let Some(principal) = self.authenticate(token.as_bytes()) else {
            return Err(Status::unauthenticated("the bearer token is not valid"));
        };
        allowed(principal, needed)
    }
}

fn allowed(principal: Principal, needed: Role) -> Result<Principal, Status> {
    if principal.role < needed {
        return Err(Status::permission_denied(format!(
            "operator {} has the {} role; this call needs {needed}",
            principal.operator, principal.role
        )));
    }
    Ok(principal)
}

/// A new random token (256 bits from the operating system, hex) and its
/// SHA-256 (hex), as configured.
pub fn new_token() -> Result<(String, String), getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let token = format!("tg_{}", hex(&bytes));
    let hash = hex(&Sha256::digest(token.as_bytes()));
    Ok((token, hash))
}

/// Parses a token hash as configured (64 hex digits).
pub fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("must be 64 hex digits (a SHA-256)".to_owned());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> (Operators, String) {
        let (token, hash) = new_token().unwrap();
        let creds = Operators::new(vec![Token {
            sha256: parse_sha256(&hash).unwrap(),
            role: Role::Read,
            operator: "auditor".into(),
        }]);
        (creds, token)
    }

    fn with(header: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        request
    }

    #[test]
    fn tokens_map_to_their_role_and_nothing_else_passes() {
        let (creds, token) = credentials();
        let bearer = format!("Bearer {token}");
        let principal = creds.authorize(&with(Some(&bearer)), Role::Read).unwrap();
        assert_eq!(principal.operator, "auditor");
        let denied = creds.authorize(&with(Some(&bearer)), Role::Write).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        for header in [None, Some("Bearer "), Some("Basic abc"), Some("Bearer tg_nope")] {
            let refused = creds.authorize(&with(header), Role::Read).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{header:?}");
            assert!(!refused.message().contains(&token));
        }
        assert!(Operators::default().authenticate(token.as_bytes()).is_none());
    }

    #[test]
    fn hashes_parse_from_hex_only() {
        assert!(parse_sha256(&"ab".repeat(32)).is_ok());
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"zz".repeat(32)).is_err());
        assert!(parse_sha256(&"é".repeat(32)).is_err());
    }
}
