//! One request's answer: the handlers of the top-songs routes and of the health checks.
//!
//! The answer (the table is in ARCHITECTURE.md, "The API"):
//! 1. Redis, one round trip (meta and songs in one transaction), under `--redis-timeout`. A
//!    stored answer computed within `--max-age` is served as is (`source: cache`); a tombstone
//!    is a hit with no songs.
//! 2. Otherwise (miss, older than max age, Redis failing) ClickHouse computes the exact answer
//!    under `--olap-timeout` (`source: olap`); when Redis answered the read, the answer is written
//!    back with the guarded `replace_top` script (a newer stored answer wins).
//! 3. ClickHouse failing: the cached answer, if any, with `stale: true`; none at all: `503`.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header::{CACHE_CONTROL, ETAG, IF_NONE_MATCH, VARY};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use topk::cache::{self, Answer, CacheError, Target};
use topk::window::{DEFAULT_LIMIT, MAX_LIMIT, Source, TopSongs, Window};

use crate::observe::{self, AnswerSource};
use crate::{AppError, AppState, Inner, auth};

/// Parses a user id from the path: a decimal unsigned 64-bit integer.
pub fn parse_user_id(text: &str) -> Result<u64, AppError> {
    text.parse::<u64>().map_err(|_| {
        AppError::BadRequest(format!(
            "user_id must be an unsigned 64-bit decimal integer, got {:?}",
            truncate(text)
        ))
    })
}

/// Parses `limit` (absent: the default).
pub fn parse_limit(text: Option<&str>) -> Result<usize, AppError> {
    let Some(text) = text else {
        return Ok(DEFAULT_LIMIT);
    };
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(AppError::BadRequest(format!(
            "limit must be an integer from 1 to {MAX_LIMIT}, got {:?}",
            truncate(text)
        ))),
    }
}

/// Echoes at most 64 characters of bad input.
fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

pub fn limit_of(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<usize, AppError> {
    let Query(params) = query.map_err(|_| {
        AppError::BadRequest("the query string is not valid form encoding".to_owned())
    })?;
    parse_limit(params.get("limit").map(String::as_str))
}

/// A user's top songs.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/top-songs",
    tag = "top-songs",
    params(
        ("user_id" = u64, Path, description = "The user (unsigned 64-bit integer)."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 50,
         description = "How many songs (default 10)."),
        ("If-None-Match" = Option<String>, Header,
         description = "ETags of answers the client holds (`*`, weak tags compared weakly): `304` when one is current."),
    ),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The user's top songs of the rolling 7-day window.", body = TopSongs,
         headers(
            ("ETag" = String, description = "A strong tag of this answer: it changes exactly when the answer does."),
            ("Cache-Control" = String, description = "`private, max-age=<--answer-max-age seconds>`: browsers may reuse it, shared caches may not store it."),
            ("Vary" = String, description = "`authorization`."),
         )),
        (status = 304, description = "Not modified: `If-None-Match` names the current answer's ETag. No body.",
         headers(("ETag" = String, description = "The current answer's tag."), ("Cache-Control" = String, description = "As for 200."))),
        (status = 400, description = "Malformed user id or limit.", body = crate::error::ErrorBody),
        (status = 401, description = "Authentication is on and the token is missing, malformed or expired.", body = crate::error::ErrorBody),
        (status = 403, description = "The token is for another user and lacks the admin scope.", body = crate::error::ErrorBody),
        (status = 404, description = "No such route.", body = crate::error::ErrorBody),
        (status = 503, description = "Neither Redis nor ClickHouse could answer in time.", body = crate::error::ErrorBody,
         headers(("Retry-After" = u32, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn user_top_songs(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Path(raw) =
        path.map_err(|_| AppError::BadRequest("the path is not valid UTF-8".to_owned()))?;
    let user_id = parse_user_id(&raw)?;
    let limit = limit_of(query)?;
    if let Some(auth) = &state.0.auth {
        auth::authorize(&auth.caller(&headers)?, user_id)?;
    }
    respond(&state.0, user_id, limit, &headers).await
}

/// The top songs of the token's own user (authentication must be on).
#[utoipa::path(
    get,
    path = "/v1/me/top-songs",
    tag = "top-songs",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 50,
         description = "How many songs (default 10)."),
        ("If-None-Match" = Option<String>, Header,
         description = "ETags of answers the client holds (`*`, weak tags compared weakly): `304` when one is current."),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The token subject's top songs.", body = TopSongs,
         headers(
            ("ETag" = String, description = "A strong tag of this answer: it changes exactly when the answer does."),
            ("Cache-Control" = String, description = "`private, max-age=<--answer-max-age seconds>`: browsers may reuse it, shared caches may not store it."),
            ("Vary" = String, description = "`authorization`."),
         )),
        (status = 304, description = "Not modified: `If-None-Match` names the current answer's ETag. No body.",
         headers(("ETag" = String, description = "The current answer's tag."), ("Cache-Control" = String, description = "As for 200."))),
        (status = 400, description = "Malformed limit.", body = crate::error::ErrorBody),
        (status = 401, description = "No valid token, a token without a user (`sub`), or authentication is off.", body = crate::error::ErrorBody),
        (status = 503, description = "Neither Redis nor ClickHouse could answer in time.", body = crate::error::ErrorBody,
         headers(("Retry-After" = u32, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn my_top_songs(
    State(state): State<AppState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Some(auth) = &state.0.auth else {
        return Err(AppError::Unauthorized(
            "authentication is off on this server: use /v1/users/{user_id}/top-songs".to_owned(),
        ));
    };
    let caller = auth.caller(&headers)?;
    let user_id = caller
        .user_id
        .ok_or_else(|| AppError::Unauthorized("the token has no `sub` user id".to_owned()))?;
    let limit = limit_of(query)?;
    respond(&state.0, user_id, limit, &headers).await
}

async fn respond(
    state: &Inner,
    user_id: u64,
    limit: usize,
    request: &HeaderMap,
) -> Result<Response, AppError> {
    let (answer, source) = answer(state, user_id, limit).await?;
    // Numbers and strings only: serializing cannot fail.
    let body = serde_json::to_vec(&answer).expect("an answer serializes");
    let etag = etag_of(&body);
    let mut response = if if_none_match(request, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    // One listener's answer, and (with auth on) only for its own token: no shared cache (a CDN,
    // a corporate proxy) may store it or hand it to another client. The browser may reuse it for
    // one refresh interval, then revalidates with the ETag.
    headers.insert(CACHE_CONTROL, state.cache_control.clone());
    headers.insert(VARY, HeaderValue::from_static("authorization"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(ETAG, value);
    }
    response.extensions_mut().insert(source);
    Ok(response)
}

/// A strong entity tag of an answer's bytes: it changes exactly when the JSON does (a new
/// computation, another window, another limit).
fn etag_of(body: &[u8]) -> String {
    format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(body))
}

/// Whether `If-None-Match` names `etag` (weak comparison, RFC 9110 13.1.2), or is `*`.
fn if_none_match(request: &HeaderMap, etag: &str) -> bool {
    request
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// Why a dependency gave no answer: it failed, or it did not answer within its deadline.
#[derive(Debug, thiserror::Error)]
pub enum Unanswered<E> {
    #[error(transparent)]
    Failed(E),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

async fn within<T, E>(
    deadline: Duration,
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, Unanswered<E>> {
    match tokio::time::timeout(deadline, future).await {
        Ok(result) => result.map_err(Unanswered::Failed),
        Err(_) => Err(Unanswered::TimedOut(deadline)),
    }
}

/// The answer for `user_id` and which path produced it (see the module doc).
pub async fn answer(
    state: &Inner,
    user_id: u64,
    limit: usize,
) -> Result<(TopSongs, AnswerSource), AppError> {
    let settings = &state.settings;
    let now = state.clock.now_ms();
    let read = within(settings.redis_timeout, async {
        let mut conn = state.redis.get().await?;
        cache::read_cached_on(&mut conn, &state.prefix, user_id, limit).await
    })
    .await;
    let redis_up = read.is_ok();
    let cached = match read {
        Ok(cached) => cached,
        Err(error) => {
            state.redis.failed();
            observe::redis_failed("read", &error);
            None
        }
    };
    let max_age = i64::try_from(settings.max_age.as_millis()).unwrap_or(i64::MAX);
    let max_ahead = i64::try_from(cache::MAX_VERSION_AHEAD.as_millis()).unwrap_or(i64::MAX);
    // An entry from further in the future than any writer's clock can be was not written by a
    // writer (a poisoned or hand-edited meta): never fresh, never served even as stale, and the
    // write-back below overwrites it.
    let cached = cached.filter(|hit| {
        let future = hit.computed_at_ms.saturating_sub(now) > max_ahead;
        if future {
            observe::cache("future");
        }
        !future
    });
    match &cached {
        Some(hit) if now.saturating_sub(hit.computed_at_ms) <= max_age => {
            observe::cache("hit");
            return Ok((hit.answer.clone(), AnswerSource::Cache));
        }
        Some(_) => observe::cache("expired"),
        None if redis_up => observe::cache("miss"),
        None => observe::cache("error"),
    }

    // Past `--max-olap-in-flight` computations, shed instead of queueing one more query.
    let Ok(_slot) = state.olap_slots.try_acquire() else {
        observe::fallback("shed");
        if let Some(hit) = cached {
            return Ok(serve_stale(hit));
        }
        return Err(AppError::Unavailable {
            reason: "too many answers are being computed from ClickHouse right now".to_owned(),
            retry_after_secs: settings.retry_after_secs,
        });
    };
    // The window and the version both come from `now`, read before the query: the version
    // never claims more than the data the query saw.
    let window = Window::at(now);
    let computed = within(
        settings.olap_timeout,
        state.query.top_for_user(user_id, window, MAX_LIMIT),
    )
    .await;
    match computed {
        Ok(songs) => {
            observe::fallback(if redis_up { "cache_miss" } else { "redis_down" });
            if redis_up {
                write_back(state, user_id, &songs, window, now).await;
            }
            let songs = songs.into_iter().take(limit).collect();
            let answer = TopSongs::new(user_id, window, now, Source::Olap, songs);
            Ok((answer, AnswerSource::Olap))
        }
        Err(error) => {
            observe::olap_failed(&error);
            if let Some(hit) = cached {
                return Ok(serve_stale(hit));
            }
            Err(AppError::Unavailable {
                reason: "no cached answer, and ClickHouse failed or did not answer in time"
                    .to_owned(),
                retry_after_secs: settings.retry_after_secs,
            })
        }
    }
}

/// An expired entry served because no fresh answer can be computed now (ClickHouse failing,
/// or the miss path at its bound), marked `stale`.
fn serve_stale(hit: cache::Cached) -> (TopSongs, AnswerSource) {
    observe::stale();
    let mut answer = hit.answer;
    answer.stale = true;
    (answer, AnswerSource::Stale)
}

/// Stores a computed answer (all of its up to 50 songs, so any later limit is a hit). A failure
/// only costs the next reader a recomputation, so it is logged, not returned.
async fn write_back(
    state: &Inner,
    user_id: u64,
    songs: &[topk::window::RankedSong],
    window: Window,
    computed_at_ms: i64,
) {
    let target = Target::new(&state.prefix, &state.settings.cache);
    let answer = Answer { user_id, songs };
    let write = async {
        let mut conn = state.redis.get().await?;
        cache::replace(&mut conn, &target, &answer, window, computed_at_ms)
            .await
            .map_err(CacheError::Redis)
    };
    match within(state.settings.redis_timeout, write).await {
        Ok(outcome) => observe::write_back(outcome),
        Err(error) => {
            state.redis.failed();
            observe::redis_failed("write_back", &error);
        }
    }
}

/// `/healthz`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    pub status: String,
}

/// `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ready {
    /// Redis answered a PING within `--redis-timeout`.
    pub redis: bool,
    /// ClickHouse answered `SELECT 1` within `--olap-timeout`.
    pub clickhouse: bool,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process answers.", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// Both dependencies answer (the API still degrades when one does not: see `/v1/…`).
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Redis and ClickHouse answer.", body = Ready),
        (status = 503, description = "Redis or ClickHouse does not answer.", body = Ready),
    ))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Ready>) {
    let state = &state.0;
    // One check at a time, its result kept for `READINESS_TTL`: `/readyz` needs no token and
    // sits outside the in-flight bound, so a loop on it must not turn into a ClickHouse query
    // and two Redis round trips per call. Callers arriving during a check wait for its result.
    let mut last = state.readiness.lock().await;
    let ready = match &*last {
        Some((at, ready)) if at.elapsed() < READINESS_TTL => ready.clone(),
        _ => {
            let ready = check_readiness(state).await;
            *last = Some((std::time::Instant::now(), ready.clone()));
            ready
        }
    };
    drop(last);
    let status = if ready.redis && ready.clickhouse {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(ready))
}

/// How long a readiness result answers `/readyz` (a load balancer polls every few seconds).
pub const READINESS_TTL: Duration = Duration::from_secs(1);

async fn check_readiness(state: &Inner) -> Ready {
    let (redis, clickhouse) = tokio::join!(
        within(state.settings.redis_timeout, state.redis.redis().ping()),
        within(state.settings.olap_timeout, state.clickhouse.ping()),
    );
    Ready {
        redis: redis.is_ok(),
        clickhouse: clickhouse.is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_decimal_u64() {
        assert_eq!(parse_user_id("0").ok(), Some(0));
        assert_eq!(parse_user_id("18446744073709551615").ok(), Some(u64::MAX));
        for bad in ["", "-1", "18446744073709551616", "1e3", "0x10", " 1", "abc"] {
            assert!(
                matches!(parse_user_id(bad), Err(AppError::BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn limits_are_1_to_50_default_10() {
        assert_eq!(parse_limit(None).ok(), Some(DEFAULT_LIMIT));
        assert_eq!(parse_limit(Some("1")).ok(), Some(1));
        assert_eq!(parse_limit(Some("50")).ok(), Some(MAX_LIMIT));
        for bad in ["0", "51", "", "-1", "ten", "2.5"] {
            assert!(
                matches!(parse_limit(Some(bad)), Err(AppError::BadRequest(_))),
                "{bad:?}"
            );
        }
    }
}
