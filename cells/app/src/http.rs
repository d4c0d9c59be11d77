//! The HTTP surface: user routes behind the ownership fence, health, status, metrics, and
//! token-protected admin routes.

use crate::consumer;
use crate::error::{AppError, AppResult};
use crate::metrics::Metrics;
use crate::orders::{OrderRequest, OrderStatus, Orders};
use crate::profiles::{Profile, ProfileRead, Profiles};
use crate::stores::{timed, Stores};
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cellplane_cell_sdk::ownership::{key_from_path, OwnershipLayer, Served};
use cellplane_cell_sdk::replication;
use cellplane_cells::app_status::AppStatus;
use cellplane_cells::auth::bearer_matches;
use cellplane_table::owner_lease::OwnerLease;
use cellplane_table::TableStore;
use mysql_async::prelude::Queryable;
use rdkafka::consumer::StreamConsumer;
use rdkafka::producer::Producer;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Names the cell that answered, on every response.
pub const SERVED_BY_HEADER: &str = "x-cellplane-served-by";

#[derive(Clone)]
pub struct App {
    pub stores: Arc<Stores>,
    pub metrics: Arc<Metrics>,
    pub profiles: Arc<Profiles>,
    pub orders: Arc<Orders>,
    pub tables: Arc<TableStore>,
    pub consumer: Arc<StreamConsumer>,
    pub landing: Arc<crate::landing::Landing>,
    /// With a table from etcd: writes need a fresh ownership lease.
    pub owner_lease: Option<Arc<OwnerLease>>,
}

pub fn router(app: App) -> Router {
    let max_body = app.stores.cfg.max_body_bytes;
    let mut fence =
        OwnershipLayer::new(&app.stores.cell, app.tables.clone(), key_from_path("users"));
    if let Some(lease) = &app.owner_lease {
        fence = fence.with_owner_lease(lease.clone());
        // The lease's key says how far this process has drained (a slot move waits on it).
        let drained = fence.clone();
        lease.publish_drained(Arc::new(move || drained.drained_epoch()));
    }
    let users = Router::new()
        .route("/users/{user}/profile", get(get_profile).put(put_profile))
        .route("/users/{user}/orders", post(place_order))
        .route("/users/{user}/orders/{order}", get(order_status))
        .layer(fence);
    // Every answer says which cell served it: how a client (or the demo) sees pinning.
    let served_by = axum::http::HeaderValue::from_str(&app.stores.cell)
        .unwrap_or_else(|_| axum::http::HeaderValue::from_static("invalid-cell-name"));
    let stamp = axum::middleware::map_response(move |mut r: Response| {
        let served_by = served_by.clone();
        async move {
            r.headers_mut().insert(SERVED_BY_HEADER, served_by);
            r
        }
    });
    let recorder = app.metrics.clone();
    let measure = axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let recorder = recorder.clone();
            async move {
                // Unmatched paths share one label so scanners cannot blow up the series count.
                let route = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "unmatched".into());
                let method = req.method().as_str().to_string();
                let started = std::time::Instant::now();
                let resp = next.run(req).await;
                recorder.observe(
                    &route,
                    &method,
                    resp.status().as_u16(),
                    started.elapsed().as_secs_f64(),
                );
                resp
            }
        },
    );
    Router::new()
        .merge(users)
        .route("/admin/stock/{sku}", put(set_stock).get(get_stock))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .route_layer(measure)
        .layer(stamp)
        .with_state(app)
}

/// The user in the path, by the key contract the router routes by
/// (`cellplane_cells::user_key`: 1 to 256 bytes of UTF-8, as sent).
fn check_user(user: &str) -> AppResult<()> {
    match cellplane_cells::user_key::from_raw(user.as_bytes()) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(AppError::BadRequest("user: the user key is empty".into())),
        Err(e) => Err(AppError::BadRequest(format!("user: {e}"))),
    }
}

async fn get_profile(
    State(app): State<App>,
    Extension(served): Extension<Served>,
    Path(user): Path<String>,
) -> AppResult<Json<ProfileRead>> {
    check_user(&user)?;
    let data = app.stores.dataset(&served.data_home);
    let suspect = app.landing.is_suspect(served.slot);
    Ok(Json(app.profiles.get(&user, &data, suspect).await?))
}

#[derive(Serialize)]
struct Written {
    version: u64,
}

async fn put_profile(
    State(app): State<App>,
    Extension(served): Extension<Served>,
    Path(user): Path<String>,
    body: Result<Json<Profile>, axum::extract::rejection::JsonRejection>,
) -> AppResult<Json<Written>> {
    check_user(&user)?;
    let Json(profile) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let data = app.stores.dataset(&served.data_home);
    let version = app.profiles.put(&user, &profile, &data).await?;
    Ok(Json(Written { version }))
}

async fn place_order(
    State(app): State<App>,
    Extension(served): Extension<Served>,
    Path(user): Path<String>,
    body: Result<Json<OrderRequest>, axum::extract::rejection::JsonRejection>,
) -> AppResult<(StatusCode, Json<OrderStatus>)> {
    check_user(&user)?;
    let Json(req) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let data = app.stores.dataset(&served.data_home);
    let status = app.orders.place(&user, req, &data).await?;
    let code = if status.stock_left.is_some() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(status)))
}

async fn order_status(
    State(app): State<App>,
    Extension(served): Extension<Served>,
    Path((user, order)): Path<(String, String)>,
) -> AppResult<Json<OrderStatus>> {
    check_user(&user)?;
    let data = app.stores.dataset(&served.data_home);
    Ok(Json(app.orders.status(&user, &order, &data).await?))
}

fn authorize(app: &App, headers: &HeaderMap) -> AppResult<()> {
    let Some(token) = &app.stores.cfg.admin_token else {
        return Err(AppError::Forbidden(
            "admin API disabled: start the app with CELL_ADMIN_TOKEN set".into(),
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if bearer_matches(presented, token) {
        Ok(())
    } else {
        Err(AppError::Forbidden("missing or wrong bearer token".into()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StockBody {
    stock: i64,
}

async fn set_stock(
    State(app): State<App>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Result<Json<StockBody>, axum::extract::rejection::JsonRejection>,
) -> AppResult<StatusCode> {
    authorize(&app, &headers)?;
    let Json(body) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    app.orders.set_stock(&sku, body.stock).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_stock(
    State(app): State<App>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> AppResult<Json<serde_json::Value>> {
    authorize(&app, &headers)?;
    let left = app.orders.stock(&sku).await?;
    Ok(Json(serde_json::json!({ "sku": sku, "stock": left })))
}

#[derive(Serialize)]
struct Check {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl<T> From<AppResult<T>> for Check {
    fn from(r: AppResult<T>) -> Self {
        Check {
            ok: r.is_ok(),
            error: r.err().map(|e| e.to_string()),
        }
    }
}

async fn check_redis(app: &App) -> AppResult<()> {
    app.stores
        .redis
        .run(|mut c| async move { c.ping::<String>().await })
        .await
        .map(|_| ())
}

async fn check_mysql(app: &App) -> AppResult<()> {
    let mut c = app.stores.mysql_conn().await?;
    timed(
        "mysql",
        app.stores.cfg.store_timeout,
        c.query_drop("SELECT 1"),
    )
    .await
}

async fn check_kafka(app: &App) -> AppResult<()> {
    let stores = app.stores.clone();
    let timeout = app.stores.cfg.store_timeout;
    let probe = tokio::task::spawn_blocking(move || {
        stores
            .producer
            .client()
            .fetch_metadata(Some(&stores.cfg.orders_topic), timeout)
            .map(|_| ())
    });
    match probe.await {
        Ok(r) => r.map_err(|e| AppError::unavailable("kafka", e)),
        Err(e) => Err(AppError::unavailable("kafka", e)),
    }
}

/// Ready only when all three stores answer: a cell missing one is not a full cell.
async fn readyz(State(app): State<App>) -> Response {
    let (redis, mysql, kafka) =
        tokio::join!(check_redis(&app), check_mysql(&app), check_kafka(&app));
    let table = app.tables.get().map(|t| t.epoch);
    // Ready with the table, or once the platform is known to have none yet: the leader
    // places a cell only after its app is ready, so waiting for a first table here would
    // wait forever on a new platform. Without a table the cell owns no slot and takes no
    // user's writes.
    let routable = table.is_some() || app.tables.none_published();
    let ready = redis.is_ok() && mysql.is_ok() && kafka.is_ok() && routable;
    let body = serde_json::json!({
        "ready": ready,
        "redis": Check::from(redis),
        "mysql": Check::from(mysql),
        "kafka": Check::from(kafka),
        "tableEpoch": table,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Kafka consumer lag and MySQL replication position: what a failover waits on.
async fn status(State(app): State<App>) -> Json<AppStatus> {
    // Asked at once: the region agent reads this every 50 ms while an operation moves the
    // cell, and an operation's step waits on it.
    let (lag, mysql) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(3),
            consumer::lag(app.stores.clone(), app.consumer.clone()),
        ),
        timed(
            "mysql",
            app.stores.cfg.store_timeout,
            replication::position(&app.stores.mysql),
        )
    );
    let orders = match lag {
        Ok(l) => l.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 3s".to_string()),
    };
    Json(AppStatus {
        cell: app.stores.cell.clone(),
        table_epoch: app.tables.get().map(|t| t.epoch),
        orders: orders.into(),
        mysql: mysql.into(),
        hot_cache_entries: app.profiles.hot_entries() as u64,
        user_requests_total: app.metrics.user_requests.get(),
    })
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            cellplane_table::metrics::OPENMETRICS_CONTENT_TYPE,
        )],
        app.metrics.encode(),
    )
}
