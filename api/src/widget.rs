//! The widget: one self-contained HTML page (inline style and script, no external assets) that a
//! site embeds in an iframe (`/widget/{user_id}`, token in the fragment: `#token=…`). Its script
//! fetches the same JSON as `/v1/users/{user_id}/top-songs` and renders the top 10 with plays and
//! freshness.

use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

use crate::AppError;
use crate::top::parse_user_id;

const PAGE: &str = include_str!("widget.html");

/// Only what the page itself contains may run; it may only talk to this origin; any site may
/// frame it (that is its purpose).
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; frame-ancestors *";

/// `/widget/{user_id}`. The id is parsed first, so only digits reach the page.
pub async fn page(path: Result<Path<String>, PathRejection>) -> Result<Response, AppError> {
    let Path(raw) =
        path.map_err(|_| AppError::BadRequest("the path is not valid UTF-8".to_owned()))?;
    let user_id = parse_user_id(&raw)?;
    let html = PAGE.replace("__USER_ID__", &user_id.to_string());
    Ok((
        [
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(html),
    )
        .into_response())
}
