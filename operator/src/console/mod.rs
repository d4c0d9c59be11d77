//! The live topology page (I/O): served by every region's operator on its HTTP port,
//! read-only, behind a bearer token (`--console-token-file`). `/console` is a page with no
//! external assets (it works in a data center without internet) that polls
//! `/console/state` every second; the data comes from the global etcd, so every region's
//! page shows the same truth the platform leader acts on. `/console/report/<id>` is an
//! operation's report. The page itself holds no data; the token travels in the URL's
//! fragment (never sent to the server, never logged) and then in the Authorization header.

pub mod state;

use crate::platform::observe::{Records, Snapshot};
use crate::platform::operations::report;
use crate::platform::operations::Operation;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use cellplane_cells::auth::bearer_matches;
use cellplane_cells::etcd_keys::drill_key;
use etcd_client::Client;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: &str = include_str!("page.html");

/// How long one read of etcd serves the page's polls (any number of open pages cost one
/// read per interval).
const CACHE_FOR: Duration = Duration::from_millis(500);

pub struct Console {
    platform: String,
    endpoints: Vec<String>,
    token: String,
    client: tokio::sync::Mutex<Option<Client>>,
    cache: parking_lot::Mutex<Option<(Instant, Arc<String>)>>,
}

impl Console {
    pub fn new(platform: &str, endpoints: &[String], token: String) -> Self {
        Self {
            platform: platform.to_string(),
            endpoints: endpoints.to_vec(),
            token,
            client: tokio::sync::Mutex::new(None),
            cache: parking_lot::Mutex::new(None),
        }
    }

    /// The page's routes.
    pub fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/console", get(|| async { Html(PAGE) }))
            .route("/console/state", get(state_handler))
            .route("/console/report/{id}", get(report_handler))
            .with_state(self)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        bearer_matches(presented, &self.token)
    }

    async fn client(&self) -> crate::Result<Client> {
        let mut c = self.client.lock().await;
        if c.is_none() {
            *c = Some(crate::platform::connect(&self.endpoints).await?);
        }
        Ok(c.clone().expect("set above"))
    }

    async fn state_json(&self) -> crate::Result<Arc<String>> {
        if let Some((at, json)) = self.cache.lock().as_ref() {
            if at.elapsed() < CACHE_FOR {
                return Ok(json.clone());
            }
        }
        let read = async {
            let mut c = self.client().await?;
            let records = Records::read(&mut c, &self.platform).await?;
            let ops = records.all();
            let moves: Vec<_> = records.moves.into_values().map(|(m, _)| m).collect();
            let snapshot = Snapshot::read(&mut c, &self.platform, &ops).await?;
            let s = state::build(
                &self.platform,
                snapshot.table.as_ref(),
                &snapshot.cells,
                &snapshot.routers,
                &ops,
                &moves,
                cellplane_table::store::now_ms(),
            );
            crate::Result::<Arc<String>>::Ok(Arc::new(
                serde_json::to_string(&s).map_err(crate::Error::Serialization)?,
            ))
        };
        match read.await {
            Ok(json) => {
                *self.cache.lock() = Some((Instant::now(), json.clone()));
                Ok(json)
            }
            Err(e) => {
                *self.client.lock().await = None;
                Err(e)
            }
        }
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "missing or wrong bearer token: open /console#token=<the console token>\n",
    )
        .into_response()
}

async fn state_handler(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if !console.authorized(&headers) {
        return unauthorized();
    }
    match console.state_json().await {
        Ok(json) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            json.as_ref().clone(),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the global etcd cannot be read: {e}\n"),
        )
            .into_response(),
    }
}

async fn report_handler(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !console.authorized(&headers) {
        return unauthorized();
    }
    if id.len() > 200 || id.contains('/') {
        return (StatusCode::BAD_REQUEST, "an operation id has no '/'\n").into_response();
    }
    let read = async {
        let mut c = console.client().await?;
        let resp = c
            .get(drill_key(&console.platform, &id), None)
            .await
            .map_err(crate::Error::Etcd)?;
        crate::Result::<Option<Operation>>::Ok(
            resp.kvs()
                .first()
                .and_then(|kv| serde_json::from_slice::<Operation>(kv.value()).ok()),
        )
    };
    match read.await {
        Ok(Some(Operation::Switchover(s))) => report::text(&s).into_response(),
        Ok(Some(Operation::Batch(b))) => report::batch_title(&b).into_response(),
        Ok(Some(Operation::SlotMove(m))) => report::move_text(&m).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("no operation {id}\n")).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the global etcd cannot be read: {e}\n"),
        )
            .into_response(),
    }
}
