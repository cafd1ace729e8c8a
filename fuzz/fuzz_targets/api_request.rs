//! The API's request parsing (`topk_api::top`, `topk_api::auth`) on arbitrary input.
//!
//! Input: up to four parts separated by `\n` (none of them may hold a newline in a real
//! request either):
//! 1. the `{user_id}` path segment (as axum hands it over: percent-decoded UTF-8);
//! 2. the query string (`limit=…&…`), parsed by the same axum `Query` extractor as the routes;
//! 3. a raw `Authorization` header value;
//! 4. a JWT claims set, signed here with the server's secret and sent as `Bearer <token>`, so
//!    that the fuzzer reaches the claims parsing behind the signature check.
//!
//! Properties: nothing panics; every refusal is the status the OpenAPI document promises (400
//! for the path and the query, 401 for the token); every accepted value is in range and
//! round-trips; a header the fuzzer made up is never accepted (it cannot know the secret); a
//! signed token is accepted exactly for the claims the contract accepts, for the user and scope
//! an independent reading of the claims finds.
#![no_main]

use std::collections::HashMap;

use axum::extract::Query;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue, Uri};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use topk::window::{DEFAULT_LIMIT, MAX_LIMIT};
use topk_api::AppError;
use topk_api::auth::{Auth, Caller};
use topk_api::top::{limit_of, parse_limit, parse_user_id};

const SECRET: &[u8] = b"fuzz-secret";

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |&b| b == b'\n');
    let path = parts.next().unwrap_or_default();
    let query = parts.next();
    let header = parts.next();
    let claims = parts.next();

    if let Ok(segment) = std::str::from_utf8(path) {
        check_user_id(segment);
    }
    if let Some(query) = query {
        check_query(query);
    }
    let auth = Auth::hs256(SECRET);
    if let Some(header) = header {
        check_forged_header(&auth, header);
    }
    if let Some(claims) = claims {
        check_signed_claims(&auth, claims);
    }
});

/// `parse_user_id` accepts exactly the decimal numbers of u64 (an optional `+`, as Rust's
/// integer parsing has it, and leading zeros included), and nothing else.
fn check_user_id(segment: &str) {
    let digits = segment.strip_prefix('+').unwrap_or(segment);
    let decimal = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    let significant = digits.trim_start_matches('0');
    // u64::MAX has 20 digits; equal lengths compare as numbers when compared as text.
    let fits = significant.len() < 20
        || (significant.len() == 20 && significant <= u64::MAX.to_string().as_str());
    match parse_user_id(segment) {
        Ok(user_id) => {
            assert!(decimal && fits, "accepted user id {segment:?}");
            // Round trip: the canonical form names the same user (Redis keys are built from it).
            let canonical = user_id.to_string();
            assert_eq!(
                canonical,
                if significant.is_empty() {
                    "0"
                } else {
                    significant
                }
            );
            assert_eq!(parse_user_id(&canonical).ok(), Some(user_id));
        }
        Err(AppError::BadRequest(message)) => {
            assert!(!(decimal && fits), "refused user id {segment:?}");
            assert_bounded_echo(&message);
        }
        Err(other) => panic!("user id {segment:?}: {other:?} instead of 400"),
    }
}

/// `limit` is 1 to 50 (default 10) and round-trips; a bad one or a query string axum cannot
/// decode is a 400.
fn check_query(query: &[u8]) {
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    // Only query strings a real request can carry: whatever `Uri` refuses never reaches axum.
    let Ok(uri) = format!("/v1/users/1/top-songs?{query}").parse::<Uri>() else {
        return;
    };
    let extracted = Query::<HashMap<String, String>>::try_from_uri(&uri);
    let raw_limit = extracted
        .as_ref()
        .ok()
        .and_then(|Query(params)| params.get("limit").cloned());
    match limit_of(extracted) {
        Ok(limit) => {
            assert!(
                (1..=MAX_LIMIT).contains(&limit),
                "limit {limit} from {query:?}"
            );
            match &raw_limit {
                None => assert_eq!(limit, DEFAULT_LIMIT),
                Some(raw) => assert_eq!(raw.parse::<usize>().ok(), Some(limit)),
            }
            assert_eq!(parse_limit(Some(&limit.to_string())).ok(), Some(limit));
        }
        Err(AppError::BadRequest(message)) => {
            if let Some(raw) = &raw_limit {
                let in_range = raw
                    .parse::<usize>()
                    .is_ok_and(|n| (1..=MAX_LIMIT).contains(&n));
                assert!(!in_range, "refused limit {raw:?}");
            }
            assert_bounded_echo(&message);
        }
        Err(other) => panic!("query {query:?}: {other:?} instead of 400"),
    }
}

/// An `Authorization` header the fuzzer made up is refused with a 401: without the secret it
/// cannot sign a token.
fn check_forged_header(auth: &Auth, header: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(header) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, value);
    match auth.caller(&headers) {
        Err(AppError::Unauthorized(_)) => {}
        other => panic!("forged header {header:?} gave {other:?}"),
    }
}

/// A token signed with the secret is accepted only when its claims are a JSON object with a
/// future integer `exp` (within the maximum lifetime) and a usable `sub`, and then speaks for
/// the `sub` and `scope` in it.
fn check_signed_claims(auth: &Auth, claims: &[u8]) {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    )
    .expect("HS256 signs any bytes");
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {signing_input}.{signature}"))
            .expect("base64url is a valid header value"),
    );
    match auth.caller(&headers) {
        Ok(caller) => check_caller(claims, &caller),
        Err(AppError::Unauthorized(_)) => {}
        Err(other) => panic!("signed claims {claims:?} gave {other:?} instead of 401"),
    }
}

#[derive(serde::Deserialize)]
struct KnownClaims {
    sub: Option<Value>,
    exp: Option<Value>,
    scope: Option<Value>,
}

fn check_caller(claims: &[u8], caller: &Caller) {
    // The independent reading takes only the three claims the contract knows, each as a JSON
    // value, and skips the others as jsonwebtoken does (serde_json skips unknown fields without
    // checking the UTF-8 of their strings or the range of their numbers: signed claims with
    // invalid UTF-8 in an unknown claim are accepted, seed `accepted_non_utf8_in_unknown_claim`;
    // harmless, only the holder of the secret can sign).
    let Ok(claims) = serde_json::from_slice::<KnownClaims>(claims) else {
        panic!("accepted claims that are not a JSON object: {claims:?}");
    };
    // `exp` is required and was in the future when checked (no leeway): it is still at least
    // the instant before the check.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let exp = claims.exp.as_ref().and_then(Value::as_f64);
    assert!(exp.is_some(), "accepted a token without a numeric exp");
    assert!(
        exp.is_some_and(|exp| exp + 1.0 >= now as f64),
        "accepted an expired token"
    );
    let user_id = match &claims.sub {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_u64().expect("a numeric sub is a u64")),
        Some(Value::String(text)) => Some(text.parse::<u64>().expect("a textual sub is a u64")),
        Some(other) => panic!("accepted sub {other:?}"),
    };
    assert_eq!(caller.user_id, user_id);
    let admin = match &claims.scope {
        Some(Value::String(text)) => text.split_ascii_whitespace().any(|s| s == "admin"),
        Some(Value::Array(list)) => list.iter().any(|s| s.as_str() == Some("admin")),
        _ => false,
    };
    assert_eq!(caller.admin, admin);
}

/// Error messages echo at most 64 characters of the input, `{:?}`-escaped (at most 10
/// characters each, `\u{10ffff}`), after fewer than 100 of their own: a huge input never makes
/// a huge response.
fn assert_bounded_echo(message: &str) {
    assert!(
        message.chars().count() <= 100 + 64 * 10,
        "error echoes too much: {message:?}"
    );
}
