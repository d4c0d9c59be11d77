//! The gRPC admin API (tonic): look up a user, show the table and cell health, hold and
//! release a cell. Authenticated by a bearer token compared in constant time, and with
//! `admin.tls` also by a client certificate (mutual TLS).

use crate::config::AdminConfig;
use crate::state::Router;
use crate::Error;
use cellplane_cells::auth::bearer_matches;
use cellplane_cells::slot::slot_for_key;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub mod proto {
    tonic::include_proto!("cellplane.router.v1");
}

use proto::router_admin_server::{RouterAdmin, RouterAdminServer};
use proto::*;

/// Reads and checks the token file named by `admin.tokenFile`.
pub fn load_token(cfg: &AdminConfig) -> Result<String, Error> {
    let token = std::fs::read_to_string(&cfg.token_file)
        .map_err(|e| Error::Config {
            field: "admin.tokenFile".into(),
            problem: format!("{}: {e}", cfg.token_file.display()),
        })?
        .trim()
        .to_string();
    if token.len() < 16 {
        return Err(Error::Config {
            field: "admin.tokenFile".into(),
            problem: "the token must be at least 16 characters (e.g. `openssl rand -hex 32`)"
                .into(),
        });
    }
    Ok(token)
}

/// Rejects calls without `authorization: Bearer <token>`.
pub fn check_token(token: &str, req: &Request<()>) -> Result<(), Status> {
    let presented = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if bearer_matches(presented, token) {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "send `authorization: Bearer <token>` with the token from admin.tokenFile",
        ))
    }
}

pub struct Admin {
    pub router: Arc<Router>,
}

impl Admin {
    fn table(&self) -> Result<Arc<cellplane_cells::routing::RoutingTable>, Status> {
        self.router
            .tables
            .get()
            .ok_or_else(|| Status::unavailable("no routing table loaded yet"))
    }
}

fn cell_arg(cell: &str) -> Result<(), Status> {
    if cell.is_empty() {
        Err(Status::invalid_argument("cell: name the cell"))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl RouterAdmin for Admin {
    async fn lookup_user(
        &self,
        req: Request<LookupUserRequest>,
    ) -> Result<Response<LookupUserReply>, Status> {
        let key = req.into_inner().key;
        if key.is_empty() {
            return Err(Status::invalid_argument("key: give the user key"));
        }
        let table = self.table()?;
        let slot = slot_for_key(&key, table.slots);
        let cell = table.cell_for_slot(slot);
        Ok(Response::new(LookupUserReply {
            slot,
            cell: cell.name.clone(),
            region: cell.region.clone(),
            epoch: table.epoch,
            frozen: cell.frozen,
            held: self.router.holds.is_held(&cell.name),
        }))
    }

    async fn get_table(
        &self,
        _: Request<GetTableRequest>,
    ) -> Result<Response<GetTableReply>, Status> {
        let table = self.table()?;
        let cells = table
            .cells
            .iter()
            .map(|c| CellSummary {
                name: c.name.clone(),
                region: c.region.clone(),
                state: format!("{:?}", c.state),
                endpoints: c.endpoints.clone(),
                standby: c.standby.clone().unwrap_or_default(),
                frozen: c.frozen,
                slots: table.slot_count(&c.name),
                held: self.router.holds.is_held(&c.name),
            })
            .collect();
        Ok(Response::new(GetTableReply {
            platform: table.platform.clone(),
            epoch: table.epoch,
            slots: table.slots,
            cells,
        }))
    }

    async fn cell_health(
        &self,
        req: Request<CellHealthRequest>,
    ) -> Result<Response<CellHealthReply>, Status> {
        let only = req.into_inner().cell;
        let table = self.table()?;
        let endpoints = &self.router.endpoints;
        let cells: Vec<CellHealth> = table
            .cells
            .iter()
            .filter(|c| only.is_empty() || c.name == only)
            .map(|c| CellHealth {
                cell: c.name.clone(),
                endpoints: c
                    .endpoints
                    .iter()
                    .map(|a| {
                        let s = endpoints.state(a);
                        EndpointHealth {
                            address: a.clone(),
                            down: s.is_down(),
                            ejected: endpoints.is_ejected(&s),
                            in_flight: s.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                        }
                    })
                    .collect(),
            })
            .collect();
        if cells.is_empty() && !only.is_empty() {
            return Err(Status::not_found(format!(
                "cell {only} is not in the table"
            )));
        }
        Ok(Response::new(CellHealthReply { cells }))
    }

    async fn hold_cell(&self, req: Request<CellRequest>) -> Result<Response<HoldReply>, Status> {
        let cell = req.into_inner().cell;
        cell_arg(&cell)?;
        if !self.table()?.cells.iter().any(|c| c.name == cell) {
            return Err(Status::not_found(format!(
                "cell {cell} is not in the table"
            )));
        }
        let held_cells = self.router.holds.set(&cell, true);
        tracing::warn!(%cell, "cell held by the admin API");
        Ok(Response::new(HoldReply {
            cell,
            held: true,
            held_cells,
        }))
    }

    async fn release_cell(&self, req: Request<CellRequest>) -> Result<Response<HoldReply>, Status> {
        let cell = req.into_inner().cell;
        cell_arg(&cell)?;
        let held_cells = self.router.holds.set(&cell, false);
        tracing::warn!(%cell, "cell released by the admin API");
        Ok(Response::new(HoldReply {
            cell,
            held: false,
            held_cells,
        }))
    }
}

fn read_pem(field: &str, path: &std::path::Path) -> Result<Vec<u8>, Error> {
    let pem = std::fs::read(path).map_err(|e| Error::Config {
        field: field.into(),
        problem: format!("{}: {e}", path.display()),
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN ") {
        return Err(Error::Config {
            field: field.into(),
            problem: format!("{}: not a PEM file", path.display()),
        });
    }
    Ok(pem)
}

/// The admin API's listener: plain, or mutual TLS when `admin.tls` is set (callers need a
/// client certificate from `clientCaFile`, and still the bearer token). Built at start so
/// bad files stop the router with the field named.
pub fn listener(cfg: &AdminConfig) -> Result<tonic::transport::Server, Error> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let server = tonic::transport::Server::builder().timeout(std::time::Duration::from_secs(10));
    let Some(tls) = &cfg.tls else {
        return Ok(server);
    };
    let identity = Identity::from_pem(
        read_pem("admin.tls.certFile", &tls.cert_file)?,
        read_pem("admin.tls.keyFile", &tls.key_file)?,
    );
    let client_ca = Certificate::from_pem(read_pem("admin.tls.clientCaFile", &tls.client_ca_file)?);
    server
        .tls_config(
            ServerTlsConfig::new()
                .identity(identity)
                .client_ca_root(client_ca),
        )
        .map_err(|e| Error::Config {
            field: "admin.tls".into(),
            problem: format!(
                "{e}: check that keyFile matches certFile and clientCaFile holds a CA certificate"
            ),
        })
}

/// Serves the admin API until the process ends; `server` comes from [`listener`] and the
/// token from [`load_token`], both checked at start.
pub async fn serve(
    mut server: tonic::transport::Server,
    listen: std::net::SocketAddr,
    token: String,
    router: Arc<Router>,
) -> Result<(), Error> {
    let svc = RouterAdminServer::with_interceptor(Admin { router }, move |req: Request<()>| {
        check_token(&token, &req).map(|()| req)
    });
    server
        .add_service(svc)
        .serve(listen)
        .await
        .map_err(|e| Error::Config {
            field: "admin.listen".into(),
            problem: e.to_string(),
        })
}
