//! The router's direct HTTP/1.1 path at the byte level: keep-alive and pipelining, every
//! response framing (length, chunked with trailers, until close, HEAD), the headers a cell
//! sees, pooled upstream connections a cell closed, and the hand-off to hyper in the middle
//! of a connection (chunked and large request bodies). The cell is a real TCP server
//! started by the test that answers with exact bytes.

use cellplane_e2e::net::{one_cell_table, RouterProc};
use cellplane_e2e::test_dir;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NO_CHECKS: &str = "healthCheck: {enabled: false}\nlimits: {replayBufferBytes: 1024}\n";

/// One HTTP/1.1 message read off a stream: its head (lower-cased, and as it came) and
/// body.
struct Message {
    head: String,
    raw_head: String,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }
}

/// How the body of a message to read is delimited, beyond its headers.
#[derive(PartialEq)]
enum Body {
    /// By content-length or chunked, else none.
    Framed,
    /// None whatever the headers say (the response to a HEAD).
    Absent,
    /// Until the connection closes, when not framed.
    UntilClose,
}

/// Reads one message: the head, then a body by content-length or chunked (returned
/// decoded), or as `body` says.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>, body: Body) -> anyhow::Result<Message> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(s, buf).await?;
    };
    let raw_head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    buf.drain(..head_end);
    let mut m = Message {
        head: raw_head.to_ascii_lowercase(),
        raw_head,
        body: Vec::new(),
    };
    if body == Body::Absent || m.head.starts_with("head ") {
        return Ok(m);
    }
    if let Some(n) = m.header("content-length") {
        let n: usize = n.parse()?;
        while buf.len() < n {
            read_more(s, buf).await?;
        }
        m.body = buf.drain(..n).collect();
    } else if m.header("transfer-encoding") == Some("chunked") {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                read_more(s, buf).await?;
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        let line = buf.drain(..i + 2).collect::<Vec<_>>();
                        if line.len() == 2 {
                            return Ok(m);
                        }
                        m.head
                            .push_str(&String::from_utf8_lossy(&line).to_ascii_lowercase());
                    } else {
                        read_more(s, buf).await?;
                    }
                }
            }
            while buf.len() < size + 2 {
                read_more(s, buf).await?;
            }
            m.body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    } else if body == Body::UntilClose {
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        m.body = std::mem::take(buf);
    }
    Ok(m)
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await??;
    anyhow::ensure!(n > 0, "connection closed mid-message");
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// A cell answering by path with exact bytes; every response body is the request head it
/// saw, so the test can check what the router sent. Counts connections accepted.
struct RawCell {
    addr: String,
    connections: Arc<AtomicU64>,
    /// Connections the cell has closed.
    closed: Arc<AtomicU64>,
}

async fn raw_cell() -> anyhow::Result<RawCell> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let connections = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let (count, closes) = (connections.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let closes = closes.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Ok(req) = read_message(&mut s, &mut buf, Body::Framed).await {
                    let seen = format!("{}body={}", req.head, req.body.len());
                    let path = req.head.split(' ').nth(1).unwrap_or("/").to_string();
                    let reply = match path.as_str() {
                        "/chunked" => {
                            let half = seen.len() / 2;
                            format!(
                                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n{:x};ext=1\r\n{}\r\n{:x}\r\n{}\r\n0\r\nx-sum: 42\r\n\r\n",
                                half, &seen[..half], seen.len() - half, &seen[half..]
                            )
                        }
                        "/until-close" => format!("HTTP/1.1 200 OK\r\n\r\n{seen}"),
                        // As many headers as hyper accepts (the direct path's limit too).
                        "/many-headers" => {
                            let many: String = (0..95).map(|i| format!("x-h{i}: {i}\r\n")).collect();
                            format!("HTTP/1.1 200 OK\r\n{many}content-length: {}\r\n\r\n{seen}", seen.len())
                        }
                        // The cell says nothing and closes the connection after answering,
                        // as a server whose keep-alive timeout passed would.
                        "/then-close" => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{seen}", seen.len()),
                        _ if req.head.starts_with("head ") => {
                            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_string()
                        }
                        // A mixed-case header name: the direct path passes names as they
                        // came, hyper writes them lower-cased (how a test tells the paths
                        // apart).
                        _ => format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\nX-Cell-Case: Kept\r\n\r\n{seen}",
                            seen.len()
                        ),
                    };
                    if s.write_all(reply.as_bytes()).await.is_err()
                        || path == "/until-close"
                        || path == "/then-close"
                    {
                        break;
                    }
                }
                drop(s);
                closes.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Ok(RawCell {
        addr,
        connections,
        closed,
    })
}

/// A raw cell and a router (file mode, no health checks, `extra` config) in front of it.
async fn raw_cell_behind_router(name: &str, extra: &str) -> anyhow::Result<(RawCell, RouterProc)> {
    let cell = raw_cell().await?;
    let dir = test_dir(name);
    let config = format!("{NO_CHECKS}{extra}");
    let (router, _) =
        RouterProc::start_on_file(&one_cell_table(&cell.addr), "", &config, &dir).await?;
    Ok((cell, router))
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: shop.example\r\nx-user-id: alice\r\n{extra}\r\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_pipelining_and_every_response_framing_pass_through() -> anyhow::Result<()> {
    let (cell, router) = raw_cell_behind_router("direct-framing", "").await?;
    let mut c = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();

    // Headers the cell sees: hop-by-hop gone, spoofed routing headers replaced.
    c.write_all(
        get(
            "/length?x=1",
            "connection: keep-alive, x-private\r\nx-private: 1\r\nx-cellplane-cell: evil\r\nx-forwarded-for: 203.0.113.7\r\n",
        )
        .as_bytes(),
    )
    .await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert!(r.head.starts_with("http/1.1 200"), "{}", r.head);
    assert!(
        r.raw_head.contains("\r\nX-Cell-Case: Kept\r\n"),
        "the direct path served it (hyper would lower-case the name): {}",
        r.raw_head
    );
    assert_eq!(r.header("x-cellplane-cell"), Some("a"));
    assert_eq!(
        r.header("keep-alive"),
        None,
        "hop-by-hop response header dropped"
    );
    let seen = String::from_utf8(r.body)?;
    assert!(seen.starts_with("get /length?x=1 http/1.1\r\n"), "{seen}");
    for expected in [
        "x-cellplane-cell: a\r\n",
        "x-cellplane-epoch: 1\r\n",
        "x-forwarded-for: 203.0.113.7, 127.0.0.1\r\n",
        "x-forwarded-host: shop.example\r\n",
        "x-forwarded-proto: http\r\n",
    ] {
        assert!(seen.contains(expected), "cell saw {seen}");
    }
    for gone in ["x-private", "connection:", "evil"] {
        assert!(!seen.contains(gone), "{gone} reached the cell: {seen}");
    }

    // Two requests in one write come back in order on the same connection.
    c.write_all(format!("{}{}", get("/one", ""), get("/two", "")).as_bytes())
        .await?;
    let one = read_message(&mut c, &mut buf, Body::Framed).await?;
    let two = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert!(String::from_utf8(one.body)?.starts_with("get /one "));
    assert!(String::from_utf8(two.body)?.starts_with("get /two "));

    // Chunked, with extensions and trailers, passed on intact.
    c.write_all(get("/chunked", "").as_bytes()).await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert!(String::from_utf8(r.body)?.starts_with("get /chunked "));
    assert!(
        r.head.contains("x-sum: 42"),
        "trailer passed on: {}",
        r.head
    );

    // A response with 95 headers passes whole.
    c.write_all(get("/many-headers", "").as_bytes()).await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert_eq!(r.header("x-h94"), Some("94"), "{}", r.head);

    // HEAD: a length but no body; the connection goes on.
    c.write_all(b"HEAD /h HTTP/1.1\r\nhost: shop.example\r\nx-user-id: alice\r\n\r\n")
        .await?;
    let r = read_message(&mut c, &mut buf, Body::Absent).await?;
    assert_eq!(r.header("content-length"), Some("5"));
    c.write_all(get("/after-head", "").as_bytes()).await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert!(String::from_utf8(r.body)?.starts_with("get /after-head "));

    // Ten more requests on this connection reuse the pooled cell connections.
    let before = cell.connections.load(Ordering::SeqCst);
    for i in 0..10 {
        c.write_all(get(&format!("/n{i}"), "").as_bytes()).await?;
        let r = read_message(&mut c, &mut buf, Body::Framed).await?;
        assert!(r.head.starts_with("http/1.1 200"));
    }
    assert_eq!(
        cell.connections.load(Ordering::SeqCst),
        before,
        "no new cell connection for sequential requests"
    );

    // A body delimited by the cell closing: passed on, then the client connection closes.
    c.write_all(get("/until-close", "").as_bytes()).await?;
    let r = read_message(&mut c, &mut buf, Body::UntilClose).await?;
    assert_eq!(r.header("connection"), Some("close"));
    assert!(String::from_utf8(r.body)?.starts_with("get /until-close "));

    // The client's own `Connection: close` is honoured.
    let mut c = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();
    c.write_all(get("/bye", "connection: close\r\n").as_bytes())
        .await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert_eq!(r.header("connection"), Some("close"));
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await?;
    assert!(rest.is_empty(), "closed after the response");
    assert_eq!(
        router
            .metric(r#"cellplane_router_http1_handoffs_total{reason="not_plain"}"#)
            .await?,
        0.0,
        "all of this was served by the direct path"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_connections_the_cell_closed_are_never_used() -> anyhow::Result<()> {
    let (cell, router) = raw_cell_behind_router("direct-stale", "").await?;
    let mut c = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();
    // The cell closes every connection right after answering; POSTs are not idempotent,
    // so a dead pooled connection would show as a 502.
    for i in 0..20 {
        c.write_all(
            format!("POST /then-close HTTP/1.1\r\nhost: s\r\nx-user-id: alice\r\ncontent-length: 2\r\n\r\n{i:02}")
                .as_bytes(),
        )
        .await?;
        let r = read_message(&mut c, &mut buf, Body::Framed).await?;
        assert!(
            r.head.starts_with("http/1.1 200"),
            "request {i}: {}",
            r.head
        );
        assert!(String::from_utf8(r.body)?.ends_with("body=2"));
        // The next request goes out once the cell has closed this connection.
        let closed = cell.closed.clone();
        cellplane_e2e::wait_for(
            "the cell to close the connection",
            Duration::from_secs(5),
            || {
                let n = closed.load(Ordering::SeqCst);
                async move { Ok((n > i).then_some(())) }
            },
        )
        .await?;
    }
    assert_eq!(cell.connections.load(Ordering::SeqCst), 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_the_direct_path_does_not_serve_are_handed_to_hyper_mid_connection(
) -> anyhow::Result<()> {
    let (_cell, router) = raw_cell_behind_router("direct-handoff", "").await?;
    let mut c = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();
    c.write_all(get("/first", "").as_bytes()).await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert!(r.head.starts_with("http/1.1 200"));

    // A chunked request body: hyper takes over this connection and forwards it.
    c.write_all(
        b"POST /chunked-in HTTP/1.1\r\nhost: s\r\nx-user-id: alice\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert!(r.head.starts_with("http/1.1 200"), "{}", r.head);
    assert_eq!(r.header("x-cellplane-cell"), Some("a"));
    let seen = String::from_utf8(r.body)?;
    assert!(
        seen.ends_with("body=11"),
        "the whole body reached the cell: {seen}"
    );
    // The connection goes on (now hyper's).
    c.write_all(get("/after", "").as_bytes()).await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert!(String::from_utf8(r.body)?.starts_with("get /after "));

    // A body over replayBufferBytes streams through hyper.
    let big = vec![b'x'; 100_000];
    let mut c = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();
    c.write_all(
        format!(
            "PUT /big HTTP/1.1\r\nhost: s\r\nx-user-id: alice\r\ncontent-length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await?;
    c.write_all(&big).await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert!(r.head.starts_with("http/1.1 200"), "{}", r.head);
    assert!(String::from_utf8(r.body)?.ends_with("body=100000"));

    // A malformed head gets hyper's 400, not a hang or a reset.
    let mut c = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();
    c.write_all(b"GET /x HTTP/1.1\r\nbad header\r\n\r\n")
        .await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert!(r.head.starts_with("http/1.1 400"), "{}", r.head);

    let handed = router
        .metric(r#"cellplane_router_http1_handoffs_total{reason="not_plain"}"#)
        .await?;
    assert_eq!(handed, 2.0, "the chunked and the large request");
    let unparsed = router
        .metric(r#"cellplane_router_http1_handoffs_total{reason="unparsed"}"#)
        .await?;
    assert_eq!(unparsed, 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_direct_path_off_hyper_serves_everything() -> anyhow::Result<()> {
    let (_cell, router) = raw_cell_behind_router("direct-off", "directHttp1: false\n").await?;
    let mut c = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();
    for path in ["/a", "/chunked", "/b"] {
        c.write_all(get(path, "").as_bytes()).await?;
        let r = read_message(&mut c, &mut buf, Body::Framed).await?;
        assert!(r.head.starts_with("http/1.1 200"), "{}", r.head);
        assert!(String::from_utf8(r.body)?.starts_with(&format!("get {path} ")));
        if path != "/chunked" {
            // hyper wrote the head: names lower-cased (the direct path keeps their case).
            assert!(
                r.raw_head.contains("\r\nx-cell-case: Kept\r\n"),
                "hyper served {path}: {}",
                r.raw_head
            );
        }
    }
    for reason in ["not_plain", "unparsed"] {
        let handed = router
            .metric(&format!(
                "cellplane_router_http1_handoffs_total{{reason=\"{reason}\"}}"
            ))
            .await?;
        assert_eq!(
            handed, 0.0,
            "nothing went through the direct path ({reason})"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_closes_idle_connections() -> anyhow::Result<()> {
    let cell = cellplane_e2e::net::Backend::start("slow").await?;
    let dir = test_dir("direct-drain");
    let (mut router, _) =
        RouterProc::start_on_file(&one_cell_table(&cell.addr), "", NO_CHECKS, &dir).await?;
    // A keep-alive connection, idle after one request.
    let mut idle = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();
    idle.write_all(get("/warm", "").as_bytes()).await?;
    assert!(read_message(&mut idle, &mut buf, Body::Framed)
        .await?
        .head
        .starts_with("http/1.1 200"));

    // A request the cell takes 800 ms to answer, in flight when the router is told to stop.
    cell.delay_ms.store(800, Ordering::SeqCst);
    let url = format!("http://{}/slow", router.addr);
    let in_flight =
        tokio::spawn(async move { cellplane_e2e::net::get(&url, &[("x-user-id", "alice")]).await });
    cellplane_e2e::wait_for(
        "the request to reach the cell",
        Duration::from_secs(5),
        || {
            let arrived = cell.arrived.load(Ordering::SeqCst);
            async move { Ok((arrived >= 2).then_some(())) }
        },
    )
    .await?;
    router.terminate()?;

    // The idle connection is closed without an answer being cut.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty());
    // The in-flight request completes.
    let r = in_flight.await??;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.starts_with("slow"), "{}", r.body);
    let status = router.exited(Duration::from_secs(10)).await?;
    assert!(status.success(), "graceful stop exits 0: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_slow_clients_are_cut_off_by_their_timeouts() -> anyhow::Result<()> {
    let (_cell, router) = raw_cell_behind_router(
        "direct-idle",
        "timeouts: {idleMs: 300, headerReadMs: 300}\n",
    )
    .await?;
    // Idle after a request: closed once idleMs passed.
    let mut c = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();
    c.write_all(get("/a", "").as_bytes()).await?;
    read_message(&mut c, &mut buf, Body::Framed).await?;
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before idleMs"
    );

    // A body that follows its head a little later, within headerReadMs: served whole.
    let mut c = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();
    c.write_all(
        b"POST /late HTTP/1.1\r\nhost: s\r\nx-user-id: alice\r\ncontent-length: 6\r\n\r\nab",
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.write_all(b"cdef").await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert!(r.head.starts_with("http/1.1 200"), "{}", r.head);
    assert!(String::from_utf8(r.body)?.ends_with("body=6"));

    // A body that stops coming: 408 once headerReadMs passed.
    let mut c = TcpStream::connect(&router.addr).await?;
    let mut buf = Vec::new();
    c.write_all(
        b"POST /slow HTTP/1.1\r\nhost: s\r\nx-user-id: alice\r\ncontent-length: 10\r\n\r\nabc",
    )
    .await?;
    let r = read_message(&mut c, &mut buf, Body::Framed).await?;
    assert!(r.head.starts_with("http/1.1 408"), "{}", r.head);
    assert!(String::from_utf8(r.body)?.contains("body_timeout"));
    Ok(())
}
