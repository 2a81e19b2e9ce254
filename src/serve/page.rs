//! The chat and labelling web page: three static files compiled into the binary (no build
//! step, nothing fetched from elsewhere).

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", include_str!("static/index.html"))
}

async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", include_str!("static/app.js"))
}

async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", include_str!("static/style.css"))
}

pub(super) fn routes<S: Send + Sync + 'static>() -> Router<Arc<S>> {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(script))
        .route("/style.css", get(style))
}
