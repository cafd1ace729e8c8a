//! Authentication (off unless a key is configured): HS256 JWT bearer tokens.
//!
//! Claims: `sub` is the user id, as a decimal string (`"42"`) or a number (`42`); `exp` (seconds
//! since the epoch) is required and checked with no leeway, and `nbf`, when present, too;
//! `scope`, a space-separated list (OAuth style) or an array, grants everything with `admin`. A
//! token may read `/v1/users/{id}/…` for its own `sub`, any id with `admin`, and `/v1/me/…`
//! answers for its `sub`.
//!
//! Secure defaults, so that a token that leaks is worth little:
//! - with `--auth-issuer` a token must carry that `iss`, with `--auth-audience` an `aud`
//!   naming that audience (a token minted for another service is refused); a token with an
//!   `aud` is refused when no audience is configured (RFC 7519 §4.1.3);
//! - `--auth-max-token-lifetime` (24 h): a token whose `exp` is further away than that is
//!   refused, and so is one whose `exp - iat` is longer, so no token is valid forever;
//! - keys are at least 256 bits ([`MIN_SECRET_BYTES`]).
//!
//! # Keys and rotation
//!
//! `--auth-secret-file` (or `TOPK_JWT_SECRET`) is one key, for tokens without a `kid` header.
//! `--auth-secret-dir` holds named keys: every regular file in it (names starting with `.` are
//! skipped: editors' and atomic writers' temporary files) is one key whose `kid` is the file
//! name, read by the same rule as the secret file. A token with a `kid` is checked with that key
//! only; an unknown `kid` is `401`. The directory is re-read when a token with a `kid` arrives
//! and the last read is [`KEY_DIR_REREAD`] (5 s) old or older: a key added is picked up and a
//! key removed stops working within seconds, without a restart, and a flood of tokens with
//! made-up `kid`s reads the disk at most once per 5 s. A re-read skips (and logs) a file it
//! cannot use, and keeps the previous keys if the directory itself cannot be read.
//!
//! To rotate: (1) write the new key into the directory under a new name, atomically (write
//! `.new` then rename it to `2026-12`), e.g. `head -c 32 /dev/urandom > .new && mv .new 2026-12`;
//! (2) issue new tokens with it (`topk token --kid 2026-12 …`); (3) once the old tokens have
//! expired, at most `--auth-max-token-lifetime` after the last one was issued, remove the old
//! key file. Removing a key file at once revokes every token signed with it (within 5 s).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use topk::telemetry::Chain;

use crate::AppError;

/// Shortest HS256 secret accepted: a key as long as the hash (RFC 7518 section 3.2); a shorter
/// one can be brute-forced offline from any token.
pub const MIN_SECRET_BYTES: usize = 32;

/// How often at most the key directory is read again (on a token with a `kid`).
pub const KEY_DIR_REREAD: Duration = Duration::from_secs(5);

/// Default of `--auth-max-token-lifetime`.
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The flags of the keys and the claims policy, shared by `topk serve` and `topk token` (the
/// same environment mints what the API accepts).
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// File holding the HS256 secret of tokens without a `kid`; turns authentication on. The
    /// secret can also come from the `TOPK_JWT_SECRET` environment variable (never a flag
    /// value: flags are visible in the process list).
    #[arg(long, env = "TOPK_API_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<PathBuf>,
    /// Directory of named HS256 keys, for rotation: each regular file is one key whose `kid` is
    /// the file name; turns authentication on. Re-read at most every 5 s when a token names a
    /// `kid`, so keys are added and removed without a restart.
    #[arg(long, env = "TOPK_API_AUTH_SECRET_DIR")]
    pub auth_secret_dir: Option<PathBuf>,
    /// When set, a token must carry this `iss` claim.
    #[arg(long, env = "TOPK_API_AUTH_ISSUER", value_parser = non_empty)]
    pub auth_issuer: Option<String>,
    /// When set, a token's `aud` claim must name this audience (a token with an `aud` is
    /// refused when unset).
    #[arg(long, env = "TOPK_API_AUTH_AUDIENCE", value_parser = non_empty)]
    pub auth_audience: Option<String>,
    /// A token whose `exp` is further away than this, or whose `exp - iat` is longer, is
    /// refused: a leaked token cannot be valid forever.
    #[arg(long, env = "TOPK_API_AUTH_MAX_TOKEN_LIFETIME", default_value = "24h",
          value_parser = topk::config::duration_in_seconds)]
    pub auth_max_token_lifetime: Duration,
}

/// The flags' defaults: no key (authentication off), no `iss` or `aud`, 24 h at most.
impl Default for AuthArgs {
    fn default() -> Self {
        topk::config::defaults()
    }
}

/// An empty `--auth-issuer`, `--auth-audience`, `--issuer` or `--audience`.
#[derive(Debug, thiserror::Error)]
#[error("must not be empty (leave it unset instead)")]
pub struct EmptyValue;

fn non_empty(text: &str) -> Result<String, EmptyValue> {
    if text.is_empty() {
        Err(EmptyValue)
    } else {
        Ok(text.to_owned())
    }
}

/// Errors configuring authentication or minting a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the JWT secret from {path}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the JWT secret {origin} has {bytes} bytes; HS256 needs at least {MIN_SECRET_BYTES} \
         (256 bits, RFC 7518 section 3.2): generate one with `head -c 32 /dev/urandom > secret`"
    )]
    ShortSecret { origin: String, bytes: usize },
    #[error("reading the JWT key directory {path}")]
    KeyDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: a key file's name is its `kid`, which must be UTF-8")]
    KidNotUtf8 { path: PathBuf },
    #[error(
        "{flags} set but no key: set --auth-secret-file, TOPK_JWT_SECRET or --auth-secret-dir \
         (authentication would be off)"
    )]
    NoKey { flags: &'static str },
    #[error(
        "no key to sign with: set --auth-secret-file or TOPK_JWT_SECRET, or name a key of \
         --auth-secret-dir with --kid"
    )]
    NoSigningKey,
    #[error("no key `{kid}` in --auth-secret-dir (a `kid` is a file name of that directory)")]
    UnknownKid { kid: String },
    #[error("--kid needs --auth-secret-dir")]
    KidWithoutDir,
    #[error(
        "a --ttl of {ttl} is longer than --auth-max-token-lifetime ({max}): the API refuses it"
    )]
    TtlTooLong { ttl: String, max: String },
    #[error("signing the token")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// The HS256 secret configured by `--auth-secret-file` or `TOPK_JWT_SECRET` (the file wins),
/// read by [`read_secret`]'s rule. `None`: no unnamed key.
pub fn configured_secret(file: Option<&Path>) -> Result<Option<Vec<u8>>, AuthError> {
    match file {
        Some(path) => read_secret_file(path).map(Some),
        None => match std::env::var_os("TOPK_JWT_SECRET") {
            Some(value) => read_secret("in TOPK_JWT_SECRET", value.into_encoded_bytes()).map(Some),
            None => Ok(None),
        },
    }
}

fn read_secret_file(path: &Path) -> Result<Vec<u8>, AuthError> {
    let bytes = std::fs::read(path).map_err(|source| AuthError::Secret {
        path: path.to_owned(),
        source,
    })?;
    read_secret(&format!("in {}", path.display()), bytes)
}

/// A secret as written, but for one trailing newline (`\n` or `\r\n`, as editors and `echo`
/// leave) and nothing else: a binary secret may end in bytes that look like whitespace. At least
/// [`MIN_SECRET_BYTES`].
fn read_secret(origin: &str, secret: Vec<u8>) -> Result<Vec<u8>, AuthError> {
    let secret = match secret.strip_suffix(b"\n") {
        Some(line) => line.strip_suffix(b"\r").unwrap_or(line).to_vec(),
        None => secret,
    };
    if secret.len() < MIN_SECRET_BYTES {
        return Err(AuthError::ShortSecret {
            origin: origin.to_owned(),
            bytes: secret.len(),
        });
    }
    Ok(secret)
}

/// Keys by `kid`.
type NamedKeys = HashMap<String, Arc<DecodingKey>>;

/// The keys of a directory, and the files that could not be used (their errors).
fn read_key_dir(dir: &Path) -> Result<(NamedKeys, Vec<AuthError>), AuthError> {
    let dir_error = |source| AuthError::KeyDir {
        path: dir.to_owned(),
        source,
    };
    let mut keys = HashMap::new();
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_error)? {
        let name = entry.map_err(dir_error)?.file_name();
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = dir.join(&name);
        // Follows symlinks (a mounted Kubernetes secret is symlinks to regular files).
        match std::fs::metadata(&path) {
            Ok(meta) if !meta.is_file() => continue,
            Ok(_) => {}
            Err(source) => {
                problems.push(AuthError::Secret { path, source });
                continue;
            }
        }
        let Ok(kid) = name.into_string() else {
            problems.push(AuthError::KidNotUtf8 { path });
            continue;
        };
        match read_secret_file(&path) {
            Ok(secret) => {
                keys.insert(kid, Arc::new(DecodingKey::from_secret(&secret)));
            }
            Err(error) => problems.push(error),
        }
    }
    Ok((keys, problems))
}

/// The named keys of `--auth-secret-dir`, re-read at most every [`KEY_DIR_REREAD`].
struct KeyDir {
    path: PathBuf,
    set: RwLock<KeySet>,
}

struct KeySet {
    keys: NamedKeys,
    read_at: Instant,
    /// Reads of the directory so far (the first one at start).
    reads: u64,
}

impl KeyDir {
    /// Reads `path`; every file must be a usable key (a mistake is reported at start).
    fn open(path: &Path) -> Result<Self, AuthError> {
        let (keys, problems) = read_key_dir(path)?;
        if let Some(problem) = problems.into_iter().next() {
            return Err(problem);
        }
        if keys.is_empty() {
            tracing::warn!(dir = %path.display(), "no JWT key in the key directory yet");
        }
        Ok(KeyDir {
            path: path.to_owned(),
            set: RwLock::new(KeySet {
                keys,
                read_at: Instant::now(),
                reads: 1,
            }),
        })
    }

    /// The key named `kid`, after re-reading the directory if the last read is old enough.
    fn key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        {
            let set = self.set.read().unwrap_or_else(|e| e.into_inner());
            if set.read_at.elapsed() < KEY_DIR_REREAD {
                return set.keys.get(kid).cloned();
            }
        }
        let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
        // Another request may have re-read it while this one waited for the lock.
        if set.read_at.elapsed() >= KEY_DIR_REREAD {
            set.read_at = Instant::now();
            set.reads += 1;
            match read_key_dir(&self.path) {
                Ok((keys, problems)) => {
                    for problem in problems {
                        tracing::warn!(error = %Chain(&problem), "JWT key file skipped");
                    }
                    set.keys = keys;
                }
                Err(error) => {
                    tracing::error!(
                        error = %Chain(&error),
                        "JWT key directory unreadable; keeping its keys"
                    );
                }
            }
        }
        set.keys.get(kid).cloned()
    }
}

/// The verifier of bearer tokens. Clones share the key directory's cache.
#[derive(Clone)]
pub struct Auth {
    /// The key of tokens without a `kid`.
    unnamed: Option<Arc<DecodingKey>>,
    named: Option<Arc<KeyDir>>,
    validation: Validation,
    max_lifetime: Duration,
}

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Option<u64>,
    pub admin: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Subject {
    Number(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scope {
    Text(String),
    List(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<Subject>,
    #[serde(default)]
    scope: Option<Scope>,
    /// As JSON values: their type is checked by jsonwebtoken (`exp`) or here (`iat`), with a
    /// reason, rather than failing the whole claims set.
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    iat: Option<serde_json::Value>,
}

fn unauthorized(reason: impl Into<String>) -> AppError {
    AppError::Unauthorized(reason.into())
}

impl Auth {
    fn with_keys(unnamed: Option<&[u8]>, named: Option<KeyDir>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        Auth {
            unnamed: unnamed.map(|secret| Arc::new(DecodingKey::from_secret(secret))),
            named: named.map(Arc::new),
            validation,
            max_lifetime: DEFAULT_MAX_TOKEN_LIFETIME,
        }
    }

    /// HS256 with `secret` for tokens without `kid`; `exp` required and checked with no leeway
    /// (an expired token is expired), and `nbf`, when present, too (a token is not valid before
    /// it); lifetime at most [`DEFAULT_MAX_TOKEN_LIFETIME`]; no `iss` or `aud` required.
    pub fn hs256(secret: &[u8]) -> Self {
        Self::with_keys(Some(secret), None)
    }

    /// As [`Auth::hs256`] with the named keys of `dir` only (every token needs a `kid`).
    pub fn key_dir(dir: &Path) -> Result<Self, AuthError> {
        Ok(Self::with_keys(None, Some(KeyDir::open(dir)?)))
    }

    /// Adds the named keys of `dir` (see the module doc).
    pub fn with_key_dir(mut self, dir: &Path) -> Result<Self, AuthError> {
        self.named = Some(Arc::new(KeyDir::open(dir)?));
        Ok(self)
    }

    /// Requires `iss` to be `issuer`.
    pub fn with_issuer(mut self, issuer: &str) -> Self {
        self.validation.set_issuer(&[issuer]);
        self.validation
            .required_spec_claims
            .insert("iss".to_owned());
        self
    }

    /// Requires `aud` to name `audience`.
    pub fn with_audience(mut self, audience: &str) -> Self {
        self.validation.set_audience(&[audience]);
        self.validation
            .required_spec_claims
            .insert("aud".to_owned());
        self
    }

    /// Refuses tokens living longer than `max` (by `exp` from now, and by `exp - iat`).
    pub fn with_max_lifetime(mut self, max: Duration) -> Self {
        self.max_lifetime = max;
        self
    }

    /// The verifier `topk serve` runs with; `None` when no key is configured (authentication
    /// off), which `--auth-issuer` or `--auth-audience` refuse.
    pub fn from_args(args: &AuthArgs) -> Result<Option<Self>, AuthError> {
        let secret = configured_secret(args.auth_secret_file.as_deref())?;
        let named = args
            .auth_secret_dir
            .as_deref()
            .map(KeyDir::open)
            .transpose()?;
        if secret.is_none() && named.is_none() {
            return match (&args.auth_issuer, &args.auth_audience) {
                (None, None) => Ok(None),
                (Some(_), _) => Err(AuthError::NoKey {
                    flags: "--auth-issuer",
                }),
                (None, Some(_)) => Err(AuthError::NoKey {
                    flags: "--auth-audience",
                }),
            };
        }
        let mut auth = Self::with_keys(secret.as_deref(), named)
            .with_max_lifetime(args.auth_max_token_lifetime);
        if let Some(issuer) = &args.auth_issuer {
            auth = auth.with_issuer(issuer);
        }
        if let Some(audience) = &args.auth_audience {
            auth = auth.with_audience(audience);
        }
        Ok(Some(auth))
    }

    /// The caller of a request, from its `Authorization: Bearer` header.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, AppError> {
        let value = headers
            .get(AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing bearer token"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("expected `Authorization: Bearer <token>`"))?;
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| unauthorized("invalid token"))?;
        let key = match header.kid {
            // The kid is the client's text: not echoed.
            Some(kid) => self
                .named
                .as_ref()
                .and_then(|dir| dir.key(&kid))
                .ok_or_else(|| unauthorized("the token's `kid` names no key of this API"))?,
            None => self.unnamed.clone().ok_or_else(|| {
                unauthorized("token lacks the `kid` header (this API has only named keys)")
            })?,
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &self.validation).map_err(|error| {
                match error.kind() {
                    ErrorKind::ExpiredSignature => unauthorized("token expired"),
                    ErrorKind::ImmatureSignature => unauthorized("token not valid yet (`nbf`)"),
                    ErrorKind::MissingRequiredClaim(claim) => {
                        unauthorized(format!("token lacks the `{claim}` claim"))
                    }
                    ErrorKind::InvalidIssuer => {
                        unauthorized("the token's `iss` is not this API's issuer")
                    }
                    ErrorKind::InvalidAudience => {
                        unauthorized("the token's `aud` does not name this API")
                    }
                    _ => unauthorized("invalid token"),
                }
            })?;
        self.check_lifetime(&data.claims)?;
        let user_id = match data.claims.sub {
            None => None,
            Some(Subject::Number(n)) => Some(n),
            Some(Subject::Text(text)) => Some(
                text.parse::<u64>()
                    .map_err(|_| unauthorized("the token's `sub` is not a user id"))?,
            ),
        };
        let admin = match data.claims.scope {
            None => false,
            Some(Scope::Text(text)) => text.split_ascii_whitespace().any(|s| s == "admin"),
            Some(Scope::List(list)) => list.iter().any(|s| s == "admin"),
        };
        Ok(Caller { user_id, admin })
    }

    /// `exp` (already validated: a number in the future) at most the max lifetime from now,
    /// and `exp - iat` at most the max lifetime.
    fn check_lifetime(&self, claims: &Claims) -> Result<(), AppError> {
        let max = self.max_lifetime.as_secs_f64();
        let too_long = |what: &str| {
            unauthorized(format!(
                "token lives longer than {} (`--auth-max-token-lifetime`): {what}",
                humantime::format_duration(self.max_lifetime)
            ))
        };
        let exp = claims
            .exp
            .as_ref()
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| unauthorized("token lacks the `exp` claim"))?;
        if exp - now_secs() as f64 > max {
            return Err(too_long("its `exp` is further away"));
        }
        match &claims.iat {
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(iat) => match iat.as_f64() {
                None => Err(unauthorized("the token's `iat` is not a number")),
                Some(iat) if exp - iat > max => Err(too_long("`exp - iat` is longer")),
                Some(_) => Ok(()),
            },
        }
    }
}

/// Seconds since the epoch, as jsonwebtoken reads the clock for `exp` and `nbf`.
fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Whether `caller` may read `user_id`'s answer.
pub fn authorize(caller: &Caller, user_id: u64) -> Result<(), AppError> {
    if caller.admin || caller.user_id == Some(user_id) {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "the token may only read its own user's songs (or needs the admin scope)".to_owned(),
        ))
    }
}

/// `topk token`: mints a bearer token with the keys and policy `topk serve` is configured with
/// (the same flags and environment), e.g. for a widget (`/widget/42#token=…`).
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The user the token reads for (`sub`).
    #[arg(long)]
    pub user: u64,
    /// Grant the `admin` scope (read any user).
    #[arg(long)]
    pub admin: bool,
    /// Lifetime of the token (`exp - iat`); at most `--auth-max-token-lifetime`.
    #[arg(long, default_value = "1h", value_parser = topk::config::duration_in_seconds)]
    pub ttl: Duration,
    /// Sign with this key of `--auth-secret-dir` (a file name) and put it in the `kid` header;
    /// without it, the key of `--auth-secret-file`/`TOPK_JWT_SECRET`, no `kid`.
    #[arg(long)]
    pub kid: Option<String>,
    /// `iss` of the token (default: `--auth-issuer`; none if neither).
    #[arg(long, value_parser = non_empty)]
    pub issuer: Option<String>,
    /// `aud` of the token (default: `--auth-audience`; none if neither).
    #[arg(long, value_parser = non_empty)]
    pub audience: Option<String>,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// The token of `args`, issued now.
pub fn mint(args: &TokenArgs) -> Result<String, AuthError> {
    mint_at(args, now_secs())
}

/// The token of `args`, issued at `now` (seconds since the epoch): `sub`, `iat`, `exp`, and
/// `scope`, `iss`, `aud` when given.
pub fn mint_at(args: &TokenArgs, now: u64) -> Result<String, AuthError> {
    let max = args.auth.auth_max_token_lifetime;
    if args.ttl > max {
        return Err(AuthError::TtlTooLong {
            ttl: humantime::format_duration(args.ttl).to_string(),
            max: humantime::format_duration(max).to_string(),
        });
    }
    let mut header = Header::new(Algorithm::HS256);
    let secret = match &args.kid {
        Some(kid) => {
            let dir = args
                .auth
                .auth_secret_dir
                .as_deref()
                .ok_or(AuthError::KidWithoutDir)?;
            // A file name of the directory, nothing else (no `../`).
            let unknown = || AuthError::UnknownKid { kid: kid.clone() };
            if kid.starts_with('.') || Path::new(kid).file_name() != Some(kid.as_ref()) {
                return Err(unknown());
            }
            let path = dir.join(kid);
            if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                return Err(unknown());
            }
            header.kid = Some(kid.clone());
            read_secret_file(&path)?
        }
        None => configured_secret(args.auth.auth_secret_file.as_deref())?
            .ok_or(AuthError::NoSigningKey)?,
    };
    let mut claims = serde_json::json!({
        "sub": args.user.to_string(),
        "iat": now,
        "exp": now + args.ttl.as_secs(),
    });
    if args.admin {
        claims["scope"] = "admin".into();
    }
    if let Some(issuer) = args.issuer.as_ref().or(args.auth.auth_issuer.as_ref()) {
        claims["iss"] = issuer.as_str().into();
    }
    if let Some(audience) = args.audience.as_ref().or(args.auth.auth_audience.as_ref()) {
        claims["aud"] = audience.as_str().into();
    }
    Ok(jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(&secret),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"unit-test-secret-of-32-bytes-at-least";

    fn now() -> i64 {
        now_secs() as i64
    }

    fn sign(kid: Option<&str>, secret: &[u8], claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).expect("sign")
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        headers
    }

    /// The 401 reason of `token`, or `Ok` with its caller.
    fn check(auth: &Auth, token: &str) -> Result<Caller, String> {
        match auth.caller(&bearer(token)) {
            Ok(caller) => Ok(caller),
            Err(AppError::Unauthorized(reason)) => Err(reason),
            Err(other) => panic!("{other:?} instead of a 401"),
        }
    }

    fn user(id: u64) -> Result<Caller, String> {
        Ok(Caller {
            user_id: Some(id),
            admin: false,
        })
    }

    /// A directory removed when dropped (the crate has no tempfile).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("topk-auth-{name}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("mkdir");
            TempDir(path)
        }

        fn key(&self, kid: &str, secret: &[u8]) {
            std::fs::write(self.0.join(kid), secret).expect("write key");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Makes the key directory's last read old enough for the next `kid` lookup to re-read.
    fn age_key_dir(auth: &Auth) {
        let dir = auth.named.as_ref().expect("a key dir");
        let mut set = dir.set.write().expect("lock");
        set.read_at = Instant::now()
            .checked_sub(KEY_DIR_REREAD)
            .expect("the monotonic clock is past 5 s");
    }

    fn reads(auth: &Auth) -> u64 {
        auth.named
            .as_ref()
            .expect("a key dir")
            .set
            .read()
            .expect("lock")
            .reads
    }

    #[test]
    fn the_flags_default_is_the_verifiers_default() {
        let args = AuthArgs::default();
        assert_eq!(args.auth_max_token_lifetime, DEFAULT_MAX_TOKEN_LIFETIME);
        assert!(args.auth_secret_file.is_none() && args.auth_issuer.is_none());
    }

    #[test]
    fn own_user_or_admin_only() {
        let user = Caller {
            user_id: Some(42),
            admin: false,
        };
        assert!(authorize(&user, 42).is_ok());
        assert!(matches!(authorize(&user, 43), Err(AppError::Forbidden(_))));
        let admin = Caller {
            user_id: None,
            admin: true,
        };
        assert!(authorize(&admin, 43).is_ok());
    }

    #[test]
    fn issuer_is_required_when_configured() {
        let exp = now() + 600;
        let auth = Auth::hs256(SECRET).with_issuer("topk");
        let good = sign(
            None,
            SECRET,
            serde_json::json!({"sub": "1", "exp": exp, "iss": "topk"}),
        );
        let other = sign(
            None,
            SECRET,
            serde_json::json!({"sub": "1", "exp": exp, "iss": "evil"}),
        );
        let none = sign(None, SECRET, serde_json::json!({"sub": "1", "exp": exp}));
        assert_eq!(check(&auth, &good), user(1));
        assert_eq!(
            check(&auth, &other),
            Err("the token's `iss` is not this API's issuer".to_owned())
        );
        assert_eq!(
            check(&auth, &none),
            Err("token lacks the `iss` claim".to_owned())
        );
        // Not configured: any issuer.
        assert_eq!(check(&Auth::hs256(SECRET), &other), user(1));
    }

    #[test]
    fn audience_is_required_when_configured() {
        let exp = now() + 600;
        let auth = Auth::hs256(SECRET).with_audience("topk-api");
        let claims = |aud: serde_json::Value| {
            sign(
                None,
                SECRET,
                serde_json::json!({"sub": "1", "exp": exp, "aud": aud}),
            )
        };
        assert_eq!(check(&auth, &claims("topk-api".into())), user(1));
        assert_eq!(
            check(&auth, &claims(serde_json::json!(["other", "topk-api"]))),
            user(1)
        );
        let wrong = Err("the token's `aud` does not name this API".to_owned());
        assert_eq!(check(&auth, &claims("other".into())), wrong);
        assert_eq!(check(&auth, &claims(serde_json::json!(["other"]))), wrong);
        let none = sign(None, SECRET, serde_json::json!({"sub": "1", "exp": exp}));
        assert_eq!(
            check(&auth, &none),
            Err("token lacks the `aud` claim".to_owned())
        );
        // Not configured: a token meant for someone else is still refused (RFC 7519 §4.1.3).
        assert_eq!(check(&Auth::hs256(SECRET), &claims("other".into())), wrong);
    }

    #[test]
    fn lifetime_is_bounded_by_exp() {
        let auth = Auth::hs256(SECRET).with_max_lifetime(Duration::from_secs(3600));
        let exp = |secs: i64| {
            sign(
                None,
                SECRET,
                serde_json::json!({"sub": "1", "exp": now() + secs}),
            )
        };
        assert_eq!(check(&auth, &exp(3500)), user(1));
        assert_eq!(
            check(&auth, &exp(3700)),
            Err("token lives longer than 1h (`--auth-max-token-lifetime`): its `exp` is further away"
                .to_owned())
        );
        // The default: a day.
        let default = Auth::hs256(SECRET);
        assert_eq!(check(&default, &exp(23 * 3600)), user(1));
        assert_eq!(
            check(&default, &exp(10 * 365 * 24 * 3600)),
            Err("token lives longer than 1day (`--auth-max-token-lifetime`): its `exp` is further away"
                .to_owned())
        );
    }

    #[test]
    fn lifetime_is_bounded_by_exp_minus_iat() {
        let auth = Auth::hs256(SECRET).with_max_lifetime(Duration::from_secs(3600));
        let now = now();
        let token = |iat: serde_json::Value| {
            sign(
                None,
                SECRET,
                serde_json::json!({"sub": "1", "exp": now + 600, "iat": iat}),
            )
        };
        assert_eq!(check(&auth, &token((now - 600).into())), user(1));
        // Expires soon, but was issued for two hours.
        assert_eq!(
            check(&auth, &token((now - 6600).into())),
            Err(
                "token lives longer than 1h (`--auth-max-token-lifetime`): `exp - iat` is longer"
                    .to_owned()
            )
        );
        assert_eq!(
            check(&auth, &token("yesterday".into())),
            Err("the token's `iat` is not a number".to_owned())
        );
    }

    #[test]
    fn a_kid_selects_its_key_only() {
        let dir = TempDir::new("kid");
        let one: &[u8] = b"key-one-of-the-directory-32-bytes!!";
        let two: &[u8] = b"key-two-of-the-directory-32-bytes!!";
        dir.key("one", one);
        dir.key("two", two);
        std::fs::create_dir(dir.0.join("subdir")).expect("mkdir");
        dir.key(".hidden", b"short");
        let auth = Auth::hs256(SECRET).with_key_dir(&dir.0).expect("keys");
        let claims = || serde_json::json!({"sub": "5", "exp": now() + 600});
        assert_eq!(check(&auth, &sign(Some("one"), one, claims())), user(5));
        assert_eq!(check(&auth, &sign(Some("two"), two, claims())), user(5));
        // Without kid: the unnamed key, and only it.
        assert_eq!(check(&auth, &sign(None, SECRET, claims())), user(5));
        assert_eq!(
            check(&auth, &sign(None, one, claims())),
            Err("invalid token".to_owned())
        );
        // A kid is checked with its own key, not any other.
        for (kid, key) in [("one", two), ("two", one), ("one", SECRET)] {
            assert_eq!(
                check(&auth, &sign(Some(kid), key, claims())),
                Err("invalid token".to_owned()),
                "{kid}"
            );
        }
        let unknown = Err("the token's `kid` names no key of this API".to_owned());
        for kid in ["three", "subdir", ".hidden", "../one", ""] {
            assert_eq!(
                check(&auth, &sign(Some(kid), one, claims())),
                unknown,
                "{kid:?}"
            );
        }
        // Only named keys: a token without kid has no key.
        let named = Auth::key_dir(&dir.0).expect("keys");
        assert_eq!(
            check(&named, &sign(None, SECRET, claims())),
            Err("token lacks the `kid` header (this API has only named keys)".to_owned())
        );
        // Without a directory, every kid is unknown.
        assert_eq!(
            check(&Auth::hs256(SECRET), &sign(Some("one"), SECRET, claims())),
            unknown
        );
    }

    #[test]
    fn keys_rotate_in_and_out_with_reads_at_most_every_5_s() {
        let dir = TempDir::new("rotate");
        let old: &[u8] = b"the-old-key-of-the-rotation-32-bytes";
        let new: &[u8] = b"the-new-key-of-the-rotation-32-bytes";
        dir.key("old", old);
        let auth = Auth::key_dir(&dir.0).expect("keys");
        let claims = || serde_json::json!({"sub": "9", "exp": now() + 600});
        let unknown = Err("the token's `kid` names no key of this API".to_owned());
        assert_eq!(check(&auth, &sign(Some("old"), old, claims())), user(9));

        // Added: not read again within 5 s of the last read, whatever the kids asked for.
        dir.key("new", new);
        for i in 0..100 {
            let kid = format!("random-{i}");
            assert_eq!(check(&auth, &sign(Some(&kid), new, claims())), unknown);
        }
        assert_eq!(check(&auth, &sign(Some("new"), new, claims())), unknown);
        assert_eq!(reads(&auth), 1, "a flood of unknown kids read the disk");
        // 5 s later, the next lookup re-reads: the new key works, clones share it.
        age_key_dir(&auth);
        let clone = auth.clone();
        assert_eq!(check(&clone, &sign(Some("new"), new, claims())), user(9));
        assert_eq!(check(&auth, &sign(Some("new"), new, claims())), user(9));
        assert_eq!(reads(&auth), 2);

        // Removed: stops working at the next re-read, also for a kid still loaded.
        std::fs::remove_file(dir.0.join("old")).expect("rm");
        assert_eq!(check(&auth, &sign(Some("old"), old, claims())), user(9));
        age_key_dir(&auth);
        assert_eq!(check(&auth, &sign(Some("old"), old, claims())), unknown);
        assert_eq!(check(&auth, &sign(Some("new"), new, claims())), user(9));

        // A bad file added later is skipped, the others keep working.
        dir.key("short", b"too short\n");
        age_key_dir(&auth);
        assert_eq!(check(&auth, &sign(Some("new"), new, claims())), user(9));
        assert_eq!(
            check(&auth, &sign(Some("short"), b"too short", claims())),
            unknown
        );
        assert_eq!(reads(&auth), 4);
    }

    #[test]
    fn a_bad_key_file_or_a_policy_without_key_is_refused_at_start() {
        let dir = TempDir::new("bad");
        dir.key("good", b"0123456789abcdef0123456789abcdef\n");
        dir.key("short", b"0123456789abcdef0123456789abcde\n");
        let error = Auth::key_dir(&dir.0).err().expect("a short key refused");
        assert!(error.to_string().contains("short has 31 bytes"), "{error}");
        let missing = dir.0.join("missing");
        let error = Auth::key_dir(&missing)
            .err()
            .expect("a missing dir refused");
        assert!(matches!(error, AuthError::KeyDir { .. }), "{error}");

        let policy_only = AuthArgs {
            auth_audience: Some("topk".to_owned()),
            ..AuthArgs::default()
        };
        // No test of this crate sets TOPK_JWT_SECRET (it would be a key).
        if std::env::var_os("TOPK_JWT_SECRET").is_none() {
            let error = Auth::from_args(&policy_only).err().expect("no key refused");
            assert!(
                error
                    .to_string()
                    .starts_with("--auth-audience set but no key"),
                "{error}"
            );
            assert!(
                Auth::from_args(&AuthArgs::default())
                    .expect("off")
                    .is_none()
            );
        }
    }

    #[test]
    fn minted_tokens_verify_and_respect_the_policy() {
        let dir = TempDir::new("mint");
        let secret_file = dir.0.join(".unnamed");
        std::fs::write(&secret_file, [SECRET, b"\n"].concat()).expect("write");
        let keys = TempDir::new("mint-keys");
        let named: &[u8] = b"named-key-of-the-mint-test-32-bytes";
        keys.key("k1", named);
        let args = TokenArgs {
            user: 42,
            admin: false,
            ttl: Duration::from_secs(3600),
            kid: None,
            issuer: None,
            audience: None,
            auth: AuthArgs {
                auth_secret_file: Some(secret_file),
                auth_secret_dir: Some(keys.0.clone()),
                auth_issuer: Some("topk".to_owned()),
                auth_audience: Some("widget".to_owned()),
                ..AuthArgs::default()
            },
        };
        let auth = Auth::from_args(&args.auth).expect("config").expect("on");
        let token = mint(&args).expect("mint");
        assert_eq!(check(&auth, &token), user(42));
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.kid, None);

        let admin = TokenArgs {
            admin: true,
            kid: Some("k1".to_owned()),
            ..args.clone()
        };
        let token = mint(&admin).expect("mint");
        assert_eq!(
            check(&auth, &token),
            Ok(Caller {
                user_id: Some(42),
                admin: true
            })
        );
        assert_eq!(
            jsonwebtoken::decode_header(&token)
                .expect("header")
                .kid
                .as_deref(),
            Some("k1")
        );
        // Signed with the named key: the unnamed one does not verify it.
        let token = mint_at(&admin, 1_000).expect("mint");
        let mut v = Validation::new(Algorithm::HS256);
        v.validate_exp = false;
        v.set_audience(&["widget"]);
        let claims =
            jsonwebtoken::decode::<serde_json::Value>(&token, &DecodingKey::from_secret(named), &v)
                .expect("named key")
                .claims;
        assert_eq!(
            claims,
            serde_json::json!({"sub": "42", "iat": 1000, "exp": 4600, "scope": "admin", "iss": "topk", "aud": "widget"})
        );

        // Overrides of iss and aud: the API refuses them.
        let other = TokenArgs {
            issuer: Some("evil".to_owned()),
            ..args.clone()
        };
        assert_eq!(
            check(&auth, &mint(&other).expect("mint")),
            Err("the token's `iss` is not this API's issuer".to_owned())
        );
        let other = TokenArgs {
            audience: Some("other".to_owned()),
            ..args.clone()
        };
        assert_eq!(
            check(&auth, &mint(&other).expect("mint")),
            Err("the token's `aud` does not name this API".to_owned())
        );

        // Refused: a ttl over the max lifetime, unknown or path-like kids.
        let long = TokenArgs {
            ttl: Duration::from_secs(25 * 3600),
            ..args.clone()
        };
        assert_eq!(
            mint(&long).err().map(|e| e.to_string()).as_deref(),
            Some(
                "a --ttl of 1day 1h is longer than --auth-max-token-lifetime (1day): the API refuses it"
            )
        );
        for kid in ["k2", "../mint-keys/k1", ".", "..", "", "k1/"] {
            let bad = TokenArgs {
                kid: Some(kid.to_owned()),
                ..args.clone()
            };
            assert!(
                matches!(mint(&bad), Err(AuthError::UnknownKid { .. })),
                "{kid:?}"
            );
        }
    }
}
