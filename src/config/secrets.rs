use std::fmt;
use std::path::Path;

use crate::api::auth::{Role, Token, parse_sha256};

use crate::store::redis::Credentials;

use super::ConfigErrors;
use super::check::Problems;
use super::file::{RedisFile, TlsFile, TokenFile, TokensFile};

/// A listener's TLS material, read at start (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificate chain.
    pub cert: Vec<u8>,
    /// Its private key.
    pub key: Vec<u8>,
    /// Clients must (data plane) or may (admin) present a certificate
    /// chaining to this CA.
    pub client_ca: Option<Vec<u8>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("client_ca", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

pub(super) fn tls(p: &mut Problems, path: &str, f: Option<&TlsFile>) -> Option<TlsSettings> {
    let f = f?;
    let mut read = |name: &str, file: &Path| match std::fs::read(file) {
        Ok(pem) if String::from_utf8_lossy(&pem).contains("-----BEGIN ") => Some(pem),
        Ok(_) => {
            p.push(format!("{path}.{name}"), format!("{}: not a PEM file", file.display()));
            None
        }
        Err(e) => {
            p.push(format!("{path}.{name}"), format!("{}: {e}", file.display()));
            None
        }
    };
    let cert = read("cert", &f.cert);
    let key = read("key", &f.key);
    let client_ca = match &f.client_ca {
        Some(file) => Some(read("client_ca", file)?),
        None => None,
    };
    Some(TlsSettings {
        cert: cert?,
        key: key?,
        client_ca,
    })
}

pub(super) fn tokens(p: &mut Problems, path: &str, entries: &[TokenFile]) -> Vec<Token> {
    let mut out = Vec::new();
    for (i, t) in entries.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let operator = t.operator.trim();
        if operator.is_empty() || operator.len() > 128 || operator.chars().any(char::is_control) {
            p.push(format!("{at}.operator"), "must be 1 to 128 printable characters");
        }
        let role = p.check(format!("{at}.role"), t.role.parse::<Role>());
        let sha256 = p.check(format!("{at}.sha256"), parse_sha256(&t.sha256));
        if let (Some(role), Some(sha256)) = (role, sha256) {
            out.push(Token {
                sha256,
                role,
                operator: operator.to_owned(),
            });
        }
    }
    out
}

pub(super) fn tokens_file(p: &mut Problems, label: &str, path: &Path) -> Vec<Token> {
    use std::os::unix::fs::PermissionsExt;
    // Whoever may write it may let in a token of their own. The mode is
    // that of the file opened, not of whatever the path names later: its
    // text, or the mode that refuses it.
    let read = || -> std::io::Result<Result<String, u32>> {
        let mut file = std::fs::File::open(path)?;
        let mode = file.metadata()?.permissions().mode();
        if mode & 0o022 != 0 {
            return Ok(Err(mode & 0o777));
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text)?;
        Ok(Ok(text))
    };
    let text = match read() {
        Ok(Ok(text)) => text,
        Ok(Err(mode)) => {
            p.push(
                label,
                format!(
                    "{}: its group or others may change it (mode {mode:o}); chmod go-w {0}",
                    path.display()
                ),
            );
            return Vec::new();
        }
        Err(e) => {
            p.push(label, format!("{}: {e}", path.display()));
            return Vec::new();
        }
    };
    match toml::from_str::<TokensFile>(&text) {
        Ok(file) => tokens(p, &format!("{}: tokens", path.display()), &file.tokens),
        Err(e) => {
            p.push(label, format!("{}: {}", path.display(), e.message()));
            Vec::new()
        }
    }
}

/// The admin tokens in the file at `path` (`[[tokens]]` entries with
/// `operator`, `role` and `sha256`), or every problem found in it.
pub fn read_admin_tokens(path: &Path) -> Result<Vec<Token>, ConfigErrors> {
    let mut p = Problems::default();
    let tokens = tokens_file(&mut p, "--admin-tokens", path);
    if p.0.is_empty() {
        Ok(tokens)
    } else {
        Err(ConfigErrors(p.0))
    }
}

/// The credentials Redis is reached with. The password never sits in the
/// file itself: it comes from the environment (`TOLLGATE_REDIS_PASSWORD`,
/// laid over the file by `sources.rs`) or a mounted secret
/// (`store.redis.password_file`).
pub(super) fn redis_credentials(p: &mut Problems, r: &RedisFile) -> Option<Credentials> {
    let password = match (&r.password, &r.password_file) {
        (Some(password), _) => Some(password.clone()),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text.trim_end_matches(['\n', '\r']).to_owned()),
            Err(e) => {
                p.push("store.redis.password_file", format!("{}: {e}", path.display()));
                None
            }
        },
        (None, None) => None,
    };
    let username = r.username.clone();
    if username.is_some() && password.is_none() {
        p.push(
            "store.redis.username",
            "needs a password (TOLLGATE_REDIS_PASSWORD or store.redis.password_file)",
        );
    }
    password.map(|password| Credentials { username, password })
}
