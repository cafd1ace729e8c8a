//! The API's one error type: every failure a client can see, mapped to a status and a JSON
//! body `{"error": <code>, "reason": <text>}`. Internal details (dependency errors) are logged
//! where they happen and never put into a response.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code: `bad_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `too_many_requests`, `unavailable`.
    pub error: String,
    /// Human-readable reason.
    pub reason: String,
}

/// What went wrong, as the client is told.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A malformed user id, limit or query string.
    #[error("{0}")]
    BadRequest(String),
    /// No token, a malformed or expired one, or authentication is off (for `/v1/me`).
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token for another user, without the admin scope.
    #[error("{0}")]
    Forbidden(String),
    #[error("no such route")]
    NotFound,
    /// This client (its IP address) already holds as many connections as one client may
    /// (`--max-connections-per-client`): the server is up, the client is over its share.
    /// `Retry-After` says when to try again.
    #[error("{reason}")]
    TooManyRequests {
        reason: String,
        retry_after_secs: u32,
    },
    /// No answer can be given in time: neither Redis nor ClickHouse answered, or the request
    /// deadline passed. `Retry-After` says when to try again.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        retry_after_secs: u32,
    },
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound => StatusCode::NOT_FOUND,
            AppError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            AppError::BadRequest(_) => "bad_request",
            AppError::Unauthorized(_) => "unauthorized",
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound => "not_found",
            AppError::TooManyRequests { .. } => "too_many_requests",
            AppError::Unavailable { .. } => "unavailable",
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            error: self.code().to_owned(),
            reason: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            AppError::Unavailable {
                retry_after_secs, ..
            }
            | AppError::TooManyRequests {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            AppError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}
