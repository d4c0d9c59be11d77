//! The router's gRPC admin API against a running router: bearer-token auth, user lookup,
//! table and health views, and hold/release of a cell's requests.

use cellplane_cells::routing::{CellEntry, RoutingTable};
use cellplane_cells::slot::slot_for_key;
use cellplane_e2e::net::{Backend, RouterProc};
use cellplane_e2e::{free_port, test_dir, wait_for};
use cellplane_router::admin::proto::router_admin_client::RouterAdminClient;
use cellplane_router::admin::proto::{
    CellHealthRequest, CellRequest, GetTableRequest, LookupUserRequest,
};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(30);

fn authed<M>(token: &str, msg: M) -> tonic::Request<M> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_authenticates_looks_up_shows_and_holds() -> anyhow::Result<()> {
    let dir = test_dir("admin");
    let (a1, b1) = (Backend::start("a1").await?, Backend::start("b1").await?);
    let cells = vec![
        (CellEntry::active("a", "us", vec![a1.addr.clone()]), 1),
        (CellEntry::active("b", "eu", vec![b1.addr.clone()]), 1),
    ];
    let t = RoutingTable::placed("shop", 1, 16384, cells)?;
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.join("token"), format!("{token}\n"))?;
    let port = free_port()?;
    let extra = format!(
        "admin: {{listen: 127.0.0.1:{port}, tokenFile: {}}}\ntimeouts: {{holdMs: 20000}}\n",
        dir.join("token").display()
    );
    let (router, _) = RouterProc::start_on_file(&t, "", &extra, &dir).await?;
    let mut client: RouterAdminClient<Channel> = wait_for("admin API up", T, || async {
        Ok(
            RouterAdminClient::connect(format!("http://127.0.0.1:{port}"))
                .await
                .ok(),
        )
    })
    .await?;

    // No token, wrong token: refused.
    let e = client.get_table(GetTableRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = client
        .get_table(authed("wrong-token-wrong-token", GetTableRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let who = client
        .lookup_user(authed(
            token,
            LookupUserRequest {
                key: "alice".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(who.slot, slot_for_key("alice", 16384));
    assert_eq!(who.cell, t.route("alice").1.name);
    assert_eq!(who.epoch, 1);
    let table = client
        .get_table(authed(token, GetTableRequest {}))
        .await?
        .into_inner();
    assert_eq!((table.epoch, table.cells.len()), (1, 2));
    assert_eq!(table.cells.iter().map(|c| c.slots).sum::<u32>(), 16384);
    let health = client
        .cell_health(authed(
            token,
            CellHealthRequest {
                cell: String::new(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(health.cells.len(), 2);
    assert!(health
        .cells
        .iter()
        .all(|c| c.endpoints.len() == 1 && !c.endpoints[0].ejected));
    let e = client
        .hold_cell(authed(
            token,
            CellRequest {
                cell: "nope".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Hold alice's cell: her request waits, other cells keep serving; release lets it go.
    let home = who.cell.clone();
    let home_backend = if home == "a" { &a1 } else { &b1 };
    let other_user = (0..)
        .map(|i| format!("u{i}"))
        .find(|u| t.route(u).1.name != home)
        .unwrap();
    let held = client
        .hold_cell(authed(token, CellRequest { cell: home.clone() }))
        .await?
        .into_inner();
    assert_eq!(held.held_cells, vec![home.clone()]);
    let before = home_backend.hits.load(Ordering::SeqCst);
    let held_before = router.metric("cellplane_router_held_total").await?;
    let router_addr = router.addr.clone();
    let pending = tokio::spawn(async move {
        cellplane_e2e::net::get(
            &format!("http://{router_addr}/shop/cart"),
            &[("x-user-id", "alice")],
        )
        .await
    });
    cellplane_e2e::wait_for("the router to hold the request", T, || {
        let router = &router;
        async move {
            let held = router.metric("cellplane_router_held_total").await?;
            Ok((held > held_before).then_some(()))
        }
    })
    .await?;
    assert!(!pending.is_finished(), "a held request waits");
    assert_eq!(
        home_backend.hits.load(Ordering::SeqCst),
        before,
        "nothing reached the held cell"
    );
    assert_eq!(
        router.request(&other_user).await?.status,
        200,
        "other cells are not held"
    );
    let released = client
        .release_cell(authed(token, CellRequest { cell: home.clone() }))
        .await?
        .into_inner();
    assert!(released.held_cells.is_empty());
    let r = tokio::time::timeout(T, pending).await???;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-cellplane-cell"], home.as_str());

    // A short token is refused at start, naming the field.
    std::fs::write(dir.join("short"), "abc")?;
    let cfg = format!(
        "table: {{file: {}}}\nadmin: {{listen: 127.0.0.1:0, tokenFile: {}}}\n",
        dir.join("table.json").display(),
        dir.join("short").display()
    );
    let err = RouterProc::refuses(&cfg, &dir)?;
    assert!(err.contains("admin.tokenFile"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_admin_tls_callers_need_a_client_certificate_from_the_ca_and_the_token(
) -> anyhow::Result<()> {
    use cellplane_e2e::pki::{self, issue};
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let dir = test_dir("admin-mtls");
    issue(&dir, "ca", "server", pki::LOCAL_SERVER)?;
    issue(&dir, "ca", "operator", pki::CLIENT)?;
    issue(&dir, "rogue-ca", "intruder", pki::CLIENT)?;
    let a1 = Backend::start("a1").await?;
    let t = RoutingTable::placed(
        "shop",
        1,
        16384,
        vec![(CellEntry::active("a", "us", vec![a1.addr.clone()]), 1)],
    )?;
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.join("token"), token)?;
    let port = free_port()?;
    let admin = |ca: &str| {
        format!(
            "admin: {{listen: 127.0.0.1:{port}, tokenFile: {}, tls: {{certFile: {}, keyFile: {}, clientCaFile: {}}}}}\n",
            dir.join("token").display(),
            dir.join("server.crt").display(),
            dir.join("server.key").display(),
            dir.join(ca).display()
        )
    };
    let (_router, _) = RouterProc::start_on_file(&t, "", &admin("ca.crt"), &dir).await?;
    let read = |f: &str| std::fs::read(dir.join(f)).expect("written above");
    let tls = |who: Option<&str>| {
        let mut c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.crt")))
            .domain_name("localhost");
        if let Some(who) = who {
            c = c.identity(Identity::from_pem(
                read(&format!("{who}.crt")),
                read(&format!("{who}.key")),
            ));
        }
        c
    };
    // Connects and asks for the table: Ok(epoch), or the error's code.
    let call = |tls: Option<ClientTlsConfig>, with_token: bool| async move {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://127.0.0.1:{port}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls)?;
        }
        let outcome = match endpoint.connect().await {
            Err(_) => Err(tonic::Code::Unavailable),
            Ok(channel) => {
                let req = if with_token {
                    authed(token, GetTableRequest {})
                } else {
                    tonic::Request::new(GetTableRequest {})
                };
                RouterAdminClient::new(channel)
                    .get_table(req)
                    .await
                    .map(|r| r.into_inner().epoch)
                    .map_err(|s| s.code())
            }
        };
        anyhow::Ok(outcome)
    };
    let ok = wait_for("admin API up with mTLS", T, || async {
        Ok(call(Some(tls(Some("operator"))), true).await?.ok())
    })
    .await?;
    assert_eq!(ok, 1, "a certificate from the CA and the token: served");
    assert_eq!(
        call(Some(tls(Some("operator"))), false).await?,
        Err(tonic::Code::Unauthenticated),
        "the certificate alone is not enough"
    );
    assert!(
        call(Some(tls(None)), true).await?.is_err(),
        "no client certificate: refused"
    );
    assert!(
        call(Some(tls(Some("intruder"))), true).await?.is_err(),
        "a certificate from another CA: refused"
    );
    assert!(call(None, true).await?.is_err(), "plaintext: refused");

    // A client CA file that is not PEM stops the router at start, naming the field.
    std::fs::write(dir.join("junk.crt"), "not a certificate")?;
    let cfg = format!(
        "table: {{file: {}}}\n{}",
        dir.join("table.json").display(),
        admin("junk.crt")
    );
    let err = RouterProc::refuses(&cfg, &dir)?;
    assert!(err.contains("admin.tls.clientCaFile"), "{err}");
    Ok(())
}
