//! The router passes protocols through: WebSocket (HTTP/1.1 upgrade) tunnels bytes both
//! ways to the user's cell, and gRPC (HTTP/2, h2c) reaches the cell over HTTP/2 with its
//! streamed body and trailers intact. Backends are real servers started by the test.

use bytes::Bytes;
use cellplane_cells::routing::{CellEntry, RoutingTable};
use cellplane_e2e::net::{one_cell_table, RouterProc};
use cellplane_e2e::test_dir;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NO_CHECKS: &str = "healthCheck: {enabled: false}\n";

/// Reads an HTTP/1.1 request head.
async fn read_head(s: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(
            s.read(&mut byte).await? == 1,
            "connection closed in the head"
        );
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).to_ascii_lowercase())
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrades_tunnel_bytes_both_ways_to_the_users_cell() -> anyhow::Result<()> {
    // A WebSocket server at the byte level: switch protocols, then echo every byte.
    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let addr = backend.local_addr()?.to_string();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let head = read_head(&mut s).await?;
                seen.lock().push(head.clone());
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: x\r\n\r\n").await?;
                let mut buf = [0u8; 1024];
                loop {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<_, anyhow::Error>(());
                    }
                    s.write_all(&buf[..n]).await?;
                }
            });
        }
    });
    let dir = test_dir("ws");
    let (router, _) =
        RouterProc::start_on_file(&one_cell_table(&addr), "", NO_CHECKS, &dir).await?;

    let mut c = TcpStream::connect(&router.addr).await?;
    c.write_all(b"GET /chat HTTP/1.1\r\nhost: shop\r\nx-user-id: alice\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n").await?;
    let answer = read_head(&mut c).await?;
    assert!(answer.starts_with("http/1.1 101"), "{answer}");
    assert!(answer.contains("upgrade: websocket"), "{answer}");
    assert!(answer.contains("x-cellplane-cell: a"), "{answer}");
    for msg in [&b"ping"[..], b"second frame", &[0u8, 255, 7]] {
        c.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).await?;
        assert_eq!(back, msg);
    }
    let head = heads.lock()[0].clone();
    assert!(
        head.contains("upgrade: websocket") && head.contains("connection: upgrade"),
        "{head}"
    );
    assert!(
        head.contains("x-cellplane-cell: a") && head.contains("sec-websocket-key"),
        "{head}"
    );
    Ok(())
}

/// A response body of one data frame and then trailers (how gRPC ends a call).
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl hyper::body::Body for WithTrailers {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_reach_the_cell_over_http2_with_trailers() -> anyhow::Result<()> {
    // An h2c server answering like gRPC: echoes the request message, ends with grpc-status.
    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let addr = backend.local_addr()?.to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = backend.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().push((req.version(), req.headers().clone()));
                        let msg = req.into_body().collect().await?.to_bytes();
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        trailers.insert("grpc-message", "echoed".parse().unwrap());
                        let body = WithTrailers {
                            data: Some(msg),
                            trailers: Some(trailers),
                        };
                        Ok::<_, hyper::Error>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let dir = test_dir("grpc");
    let (router, _) =
        RouterProc::start_on_file(&one_cell_table(&addr), "", NO_CHECKS, &dir).await?;

    // The client speaks HTTP/2 with prior knowledge, as gRPC clients do over h2c.
    let tcp = TcpStream::connect(&router.addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    // A length-prefixed gRPC message: flag 0, length 5, "hello".
    let message = Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/shop.Cart/Add", router.addr))
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-user-id", "alice")
        .body(Full::new(message.clone()))?;
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cellplane-cell"], "a");
    let collected = resp.into_body().collect().await?;
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "echoed");
    assert_eq!(
        collected.to_bytes(),
        message,
        "the message went through and back"
    );

    let (version, headers) = seen.lock()[0].clone();
    assert_eq!(
        version,
        http::Version::HTTP_2,
        "the cell is reached over HTTP/2"
    );
    assert_eq!(headers["te"], "trailers");
    assert_eq!(headers["x-cellplane-cell"], "a");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_terminates_http1_and_http2_and_bad_key_files_are_named() -> anyhow::Result<()> {
    let dir = test_dir("tls");
    let (cert, key) =
        cellplane_e2e::pki::issue(&dir, "ca", "server", cellplane_e2e::pki::LOCAL_SERVER)?;
    let backend = cellplane_e2e::net::Backend::start("a1").await?;
    let tls = format!(
        "{NO_CHECKS}tls: {{certFile: {}, keyFile: {}}}\n",
        cert.display(),
        key.display()
    );
    let (router, _) =
        RouterProc::start_on_file(&one_cell_table(&backend.addr), "", &tls, &dir).await?;

    for (flag, status_line) in [("--http1.1", "HTTP/1.1 200"), ("--http2", "HTTP/2 200")] {
        let out = std::process::Command::new("curl")
            .args(["-s", "-D", "-", "-o", "/dev/null", flag, "--cacert"])
            .arg(dir.join("ca.crt"))
            .args([
                "-H",
                "x-user-id: alice",
                &format!("https://{}/shop/cart", router.addr),
            ])
            .output()?;
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(
            head.starts_with(&status_line.to_ascii_lowercase()),
            "{flag}: {head}"
        );
        assert!(
            head.contains("x-seen-proto: https"),
            "the cell learns the client used TLS: {head}"
        );
        assert!(head.contains("x-backend: a1"), "{head}");
    }
    // Plain HTTP on the TLS port gets no answer.
    assert!(cellplane_e2e::net::get(
        &format!("http://{}/", router.addr),
        &[("x-user-id", "alice")]
    )
    .await
    .is_err());

    // A missing key file stops the router at start, naming the field.
    let cfg = format!(
        "table: {{file: {}}}\ntls: {{certFile: {}, keyFile: /nonexistent.pem}}\n",
        dir.join("table.json").display(),
        cert.display()
    );
    let err = RouterProc::refuses(&cfg, &dir)?;
    assert!(err.contains("tls.keyFile"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_broken_before_any_answer_is_retried_for_idempotent_methods_only(
) -> anyhow::Result<()> {
    // One endpoint reads each request and hangs up without answering; the other is fine.
    let broken = TcpListener::bind("127.0.0.1:0").await?;
    let broken_addr = broken.local_addr()?.to_string();
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = broken.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                if read_head(&mut s).await.is_ok() {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut body = [0u8; 4];
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_millis(20),
                        s.read(&mut body),
                    )
                    .await;
                } // dropped: the connection closes without an answer
            });
        }
    });
    let good = cellplane_e2e::net::Backend::start("good").await?;
    let t = RoutingTable::placed(
        "shop",
        1,
        16384,
        vec![(
            CellEntry::active("a", "us", vec![broken_addr, good.addr.clone()]),
            1,
        )],
    )?;
    let dir = test_dir("idempotent");
    // Keep the broken endpoint in rotation (no checks, no ejection) so every request can hit it.
    let extra = format!("{NO_CHECKS}ejection: {{consecutiveFailures: 100000}}\nlimits: {{retryBudgetMinPerSec: 10000}}\n");
    let (router, _) = RouterProc::start_on_file(&t, "", &extra, &dir).await?;
    let url = format!("http://{}/shop/cart", router.addr);
    for _ in 0..20 {
        let r = cellplane_e2e::net::get(&url, &[("x-user-id", "alice")]).await?;
        assert_eq!(
            r.status, 200,
            "a GET is retried on the good endpoint: {}",
            r.body
        );
    }
    let after_gets = seen.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        after_gets > 0,
        "the broken endpoint was tried (so retries happened)"
    );
    let mut failed_posts = 0;
    for _ in 0..20 {
        let r = cellplane_e2e::net::send(
            "POST",
            &url,
            &[("x-user-id", "alice")],
            Bytes::from_static(b"order"),
        )
        .await?;
        if r.status == 502 {
            failed_posts += 1;
        } else {
            assert_eq!(r.status, 200);
        }
    }
    let post_hits = seen.load(std::sync::atomic::Ordering::SeqCst) - after_gets;
    assert_eq!(
        failed_posts, post_hits,
        "every POST that reached the broken endpoint failed, none was replayed"
    );
    assert!(post_hits > 0);
    assert!(
        router
            .metric(r#"cellplane_router_retries_total{reason="idempotent"}"#)
            .await?
            >= after_gets as f64
    );
    Ok(())
}
