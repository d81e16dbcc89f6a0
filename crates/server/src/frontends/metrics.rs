//! The metrics listener: `GET /metrics` in Prometheus text format.

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{
    AppState, buffer_body, metrics_cors, not_allowed, not_found, openapi, with_description,
};

/// The metrics listener's routes, with `OPTIONS /` describing them as TorchServe's does.
pub fn router(state: AppState) -> Router {
    let routes = Router::new().route("/metrics", get(metrics).fallback(not_allowed));
    with_description(routes, doc)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            buffer_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics_cors,
        ))
        .with_state(state)
}

fn doc() -> serde_json::Value {
    openapi(
        "metrics",
        &[(
            "/metrics",
            &["GET"],
            "Prometheus text; `name[]` selects series by name.",
        )],
    )
}

async fn metrics(State(st): State<AppState>, RawQuery(q): RawQuery) -> Response {
    let mut load_times = Vec::new();
    for entry in st.registry.snapshot_entries().values() {
        for m in entry.versions.values() {
            let l = [m.name.as_str(), m.version.as_str()];
            // Named as TorchServe names its workers: W-<id>-<model>_<version>.
            load_times.extend(m.pool.workers().into_iter().filter_map(|w| {
                Some((format!("W-{}-{}_{}", w.id, m.name, m.version), w.load_ms?))
            }));
            st.metrics
                .queue_depth
                .with_label_values(&l)
                .set(m.pool.queue_len() as i64);
            // Shown from 0, so that rate() sees a version's first timeout and replacement.
            st.metrics.timeouts.with_label_values(&l);
            st.metrics.workers_replaced.with_label_values(&l);
            let ready = m.pool.ready_count() as i64;
            st.metrics
                .workers
                .with_label_values(&[l[0], l[1], "ready"])
                .set(ready);
            st.metrics
                .workers
                .with_label_values(&[l[0], l[1], "not_ready"])
                .set(m.pool.worker_count() as i64 - ready);
        }
    }
    st.metrics.set_worker_load_times(&load_times);
    if !st.config.disable_system_metrics {
        // A few small /proc reads and one statvfs: quick enough for an async thread.
        st.metrics.sample_host();
    }
    // `?name[]=a&name[]=b` keeps only those metrics, as TorchServe's endpoint does.
    let names: Vec<String> =
        serde_urlencoded::from_str::<Vec<(String, String)>>(q.as_deref().unwrap_or(""))
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k == "name[]" || k == "name")
            .map(|(_, v)| v)
            .collect();
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(&names),
    )
        .into_response()
}
