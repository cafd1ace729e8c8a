//! The OpenAPI 3.1 document, generated from the handlers' annotations and the answer's types,
//! served at `/openapi.json`. The test suite fuzzes the running API against it (schemathesis).

use axum::Json;
use utoipa::Number;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{KnownFormat, Schema, SchemaFormat};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::ErrorBody;
use crate::top::{self, Health, Ready};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "topk",
        description = "Every listener's top songs of the past 7 days (rolling window of 10,080 \
                       one-minute UTC buckets). Bearer tokens (HS256 JWT) are required only when \
                       the server runs with authentication on."
    ),
    paths(top::user_top_songs, top::my_top_songs, top::healthz, top::readyz),
    components(schemas(
        topk::window::TopSongs,
        topk::window::RankedSongJson,
        topk::window::WindowJson,
        topk::window::Source,
        ErrorBody,
        Health,
        Ready
    )),
    modifiers(&Fixups)
)]
pub struct ApiDoc;

struct Fixups;

impl Modify for Fixups {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("JWT".to_owned());
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
        // utoipa describes a u64 as `format: int64`, whose range stops at 2^63 - 1: clients
        // (and the fuzzer) would refuse ids the API accepts. Every unsigned 64-bit integer is
        // described by its true range instead.
        for schema in components.schemas.values_mut() {
            if let RefOr::T(Schema::Object(object)) = schema {
                object.properties.values_mut().for_each(widen_u64);
            }
        }
        for item in openapi.paths.paths.values_mut() {
            let operations = item.get.iter_mut();
            for parameter in operations.flat_map(|op| op.parameters.iter_mut().flatten()) {
                if let Some(schema) = parameter.schema.as_mut() {
                    widen_u64(schema);
                }
            }
        }
    }
}

/// `{type: integer, format: int64, minimum: 0}` (a u64) → `{type: integer, minimum: 0,
/// maximum: 18446744073709551615}`.
fn widen_u64(schema: &mut RefOr<Schema>) {
    let RefOr::T(Schema::Object(object)) = schema else {
        return;
    };
    let is_u64 = matches!(
        object.format,
        Some(SchemaFormat::KnownFormat(KnownFormat::Int64))
    ) && match object.minimum {
        Some(Number::Int(n)) => n == 0,
        Some(Number::UInt(n)) => n == 0,
        Some(Number::Float(n)) => n == 0.0,
        None => false,
    };
    if is_u64 {
        object.format = None;
        object.maximum = Some(Number::UInt(
            usize::try_from(u64::MAX).unwrap_or(usize::MAX),
        ));
    }
}

/// `/openapi.json`.
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
