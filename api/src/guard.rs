//! Bounds against abusive clients that are checked per request (the per-connection ones, header
//! read timeout, head size and connection count, are in [`crate::serve`]).

use axum::BoxError;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;

use crate::{AppError, AppState};

/// At most `max` requests in flight through the layered routes, shared by all of them (one
/// semaphore, not one per route); one more is shed at once with `503`, `Retry-After` and a JSON
/// reason: queueing it would only hold its connection and memory for an answer that comes late.
pub fn in_flight_bound(
    max: u32,
    retry_after_secs: u32,
) -> impl tower::Layer<
    axum::routing::Route,
    Service: tower::Service<
        Request,
        Response: IntoResponse + 'static,
        Error: Into<std::convert::Infallible> + 'static,
        Future: Send + 'static,
    > + Clone
                 + Send
                 + Sync
                 + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    ServiceBuilder::new()
        .layer(HandleErrorLayer::new(move |error: BoxError| async move {
            shed(&error, retry_after_secs)
        }))
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::new(
            usize::try_from(max).unwrap_or(usize::MAX),
        ))
}

fn shed(error: &BoxError, retry_after_secs: u32) -> AppError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        metrics::counter!("topk_api_shed_total").increment(1);
        AppError::Unavailable {
            reason: "too many requests in flight; retry later".to_owned(),
            retry_after_secs,
        }
    } else {
        // The routes' errors are `Infallible`: only the shedder can fail.
        tracing::error!(%error, "unexpected middleware error");
        AppError::Unavailable {
            reason: "internal error".to_owned(),
            retry_after_secs,
        }
    }
}

/// `400` with a JSON reason for a path and query longer than `--max-uri-bytes` (hyper's own
/// limits are far higher and answer without a body).
pub async fn uri_length(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let uri = request.uri();
    let length = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    let max = usize::try_from(state.0.settings.max_uri_bytes).unwrap_or(usize::MAX);
    if length > max {
        return AppError::BadRequest(format!(
            "the request URI is {length} bytes long, more than the {max} allowed"
        ))
        .into_response();
    }
    next.run(request).await
}
