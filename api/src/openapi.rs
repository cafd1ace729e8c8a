//! The OpenAPI 3.1 document, generated from the handlers' annotations and the answer's types,
//! served at `/openapi.json`. The test suite fuzzes the running API against it (schemathesis).

use axum::Json;
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
        topk::window::RankedSong,
        topk::window::WindowJson,
        topk::window::Source,
        ErrorBody,
        Health,
        Ready
    )),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("JWT".to_owned());
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
    }
}

/// `/openapi.json`.
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
