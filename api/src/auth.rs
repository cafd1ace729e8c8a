//! Authentication (off unless a secret is configured): HS256 JWT bearer tokens.
//!
//! Claims: `sub` is the user id, as a decimal string (`"42"`) or a number (`42`); `exp` (seconds
//! since the epoch) is required; `scope`, a space-separated list (OAuth style) or an array,
//! grants everything with `admin`. A token may read `/v1/users/{id}/…` for its own `sub`, any
//! id with `admin`, and `/v1/me/…` answers for its `sub`.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::AppError;

/// The verifier of bearer tokens.
#[derive(Clone)]
pub struct Auth {
    key: DecodingKey,
    validation: Validation,
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
}

impl Auth {
    /// HS256 with `secret`; `exp` required and checked with no leeway (an expired token is
    /// expired), and `nbf`, when present, too (a token is not valid before it).
    pub fn hs256(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        Auth {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The caller of a request, from its `Authorization: Bearer` header.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, AppError> {
        let value = headers
            .get(AUTHORIZATION)
            .ok_or_else(|| AppError::Unauthorized("missing bearer token".to_owned()))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                AppError::Unauthorized("expected `Authorization: Bearer <token>`".to_owned())
            })?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    AppError::Unauthorized("token expired".to_owned())
                }
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                    AppError::Unauthorized("token not valid yet (`nbf`)".to_owned())
                }
                jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(claim) => {
                    AppError::Unauthorized(format!("token lacks the `{claim}` claim"))
                }
                _ => AppError::Unauthorized("invalid token".to_owned()),
            },
        )?;
        let user_id = match data.claims.sub {
            None => None,
            Some(Subject::Number(n)) => Some(n),
            Some(Subject::Text(text)) => Some(text.parse::<u64>().map_err(|_| {
                AppError::Unauthorized("the token's `sub` is not a user id".to_owned())
            })?),
        };
        let admin = match data.claims.scope {
            None => false,
            Some(Scope::Text(text)) => text.split_ascii_whitespace().any(|s| s == "admin"),
            Some(Scope::List(list)) => list.iter().any(|s| s == "admin"),
        };
        Ok(Caller { user_id, admin })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
