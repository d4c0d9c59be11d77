//! The direct HTTP/1.1 path. Plain keep-alive requests with small bodies, the bulk of an
//! edge router's traffic, are parsed in place (httparse) and forwarded over the router's
//! own pooled upstream connections from the client connection's task: no header maps, no
//! per-request allocations, no hand-off to a pool task. Its decisions are the driver's
//! (`driver::admit`, `driver::drive`); only its send step (`DirectExchange`) is its own.
//! Everything else (HTTP/2, upgrades, `Expect`, chunked or large
//! request bodies, malformed or oversized heads) is handed to hyper with the bytes already
//! read, and hyper serves the rest of that connection.

mod rewind;
pub mod wire;

pub use rewind::Rewind;

use crate::driver::{self, Exchange, Failure, RequestFacts, Routed, SendError};
use crate::http_rules::{self, Rejection};
use crate::state::Router;
use crate::upstream;
use bytes::{Buf, BytesMut};
use http::StatusCode;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use wire::{Framing, Plain};

/// Headers per request or response the direct path parses, as many as hyper allows; a
/// request with more goes to hyper (which refuses it), a response with more is refused.
const MAX_HEADERS: usize = 100;
/// Longest response head accepted from a cell.
const MAX_RESPONSE_HEAD: usize = 64 << 10;
const READ_CHUNK: usize = 16 << 10;

type HeaderSlots<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

/// Room for the headers of one message, not initialised: httparse writes what it parses,
/// so no per-message clearing of 100 slots.
fn no_headers<'b>() -> HeaderSlots<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

fn parse_response<'h, 'b>(
    resp: &mut httparse::Response<'h, 'b>,
    buf: &'b [u8],
    headers: &'h mut HeaderSlots<'b>,
) -> httparse::Result<usize> {
    httparse::ParserConfig::default().parse_response_with_uninit_headers(resp, buf, headers)
}

/// How a client connection served by the direct path ended.
pub enum Outcome<S> {
    Closed,
    /// A request the direct path does not serve: hyper takes the connection from here.
    HandOff(Rewind<S>),
}

/// Serves requests on one client connection until it closes, the router shuts down, or a
/// request needs hyper. `shutdown` turning true closes the connection between requests.
pub async fn serve<S>(
    router: &Router,
    mut client: S,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> Outcome<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = &router.config;
    let idle = Duration::from_millis(cfg.timeouts.idle_ms);
    let head_read = Duration::from_millis(cfg.timeouts.header_read_ms);
    let max_head = cfg.limits.max_header_bytes;
    let max_body = cfg
        .limits
        .replay_buffer_bytes
        .min(cfg.limits.max_body_bytes) as usize;
    let mut inbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut bufs = Buffers {
        out: Vec::with_capacity(READ_CHUNK),
        upstream: BytesMut::with_capacity(READ_CHUNK),
        peer: wire::peer_text(peer.ip()),
    };
    if *shutdown.borrow() {
        return Outcome::Closed;
    }
    // One shutdown future and one idle timer for the connection's life, not one of each
    // per request: the future sees a shutdown signalled while it was not being polled.
    let mut shutdown = shutdown;
    let stop = shutdown.changed();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(stop, idle_timer);
    loop {
        if inbuf.is_empty() {
            // Between requests: idle up to `idleMs`, or until shutdown.
            idle_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + idle);
            tokio::select! {
                read = client.read_buf(&mut inbuf) => match read {
                    Ok(n) if n > 0 => {}
                    _ => return Outcome::Closed,
                },
                _ = &mut idle_timer => return Outcome::Closed,
                _ = &mut stop => return Outcome::Closed,
            }
        }
        // Once a request has begun, its head and body arrive within `headerReadMs`.
        let deadline = tokio::time::Instant::now() + head_read;
        // Head plus body length, once the head has been parsed: until that much is in, the
        // head is not parsed again.
        let mut whole: Option<usize> = None;
        let (used, keep_alive) = loop {
            if whole.is_none_or(|w| inbuf.len() >= w) {
                let mut headers = no_headers();
                let mut req = httparse::Request::new(&mut []);
                match req.parse_with_uninit_headers(&inbuf, &mut headers) {
                    Ok(httparse::Status::Complete(head)) => match wire::plain(&req, max_body) {
                        Some(plain) if inbuf.len() >= head + plain.body_len => {
                            let body = &inbuf[head..head + plain.body_len];
                            let keep =
                                respond(router, &mut client, &req, body, &plain, peer, &mut bufs)
                                    .await;
                            break (head + plain.body_len, keep);
                        }
                        Some(plain) => whole = Some(head + plain.body_len),
                        None => return hand_off(router, client, inbuf, "not_plain"),
                    },
                    Ok(httparse::Status::Partial) if inbuf.len() < max_head => {}
                    // Malformed, too many headers or too long: hyper gives the answer.
                    _ => return hand_off(router, client, inbuf, "unparsed"),
                }
            }
            match tokio::time::timeout_at(deadline, client.read_buf(&mut inbuf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Outcome::Closed,
                Err(_) if whole.is_some() => {
                    let r = Rejection::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "body_timeout",
                        "the request body did not arrive in time (timeouts.headerReadMs)",
                        None,
                    );
                    reject(router, &mut client, &mut bufs.out, &r, true).await;
                    return Outcome::Closed;
                }
                Err(_) => return Outcome::Closed,
            }
        };
        if !keep_alive {
            let _ = client.shutdown().await;
            return Outcome::Closed;
        }
        inbuf.advance(used);
    }
}

fn hand_off<S>(router: &Router, client: S, read: BytesMut, reason: &'static str) -> Outcome<S> {
    router
        .metrics
        .handoffs
        .get_or_create(&crate::metrics::ReasonLabel { reason })
        .inc();
    Outcome::HandOff(Rewind::new(client, read.freeze()))
}

/// Buffers reused across the requests of one connection.
struct Buffers {
    /// What is written next: the upstream request, then the client response.
    out: Vec<u8>,
    /// What the cell sent.
    upstream: BytesMut,
    /// The client's address for `X-Forwarded-For`.
    peer: Vec<u8>,
}

/// Writes (and counts) the router's own answer; false: the connection ends after it.
async fn reject<S: AsyncWrite + Unpin>(
    router: &Router,
    client: &mut S,
    out: &mut Vec<u8>,
    r: &Rejection,
    close: bool,
) -> bool {
    router.metrics.reject(r.reason);
    out.clear();
    wire::write_rejection(out, r, close);
    client.write_all(out).await.is_ok() && !close
}

/// A response head from the cell, checked and already rendered for the client.
struct Answer {
    upstream: TcpStream,
    head_len: usize,
    status: u16,
    framing: Result<Framing, wire::BadResponse>,
    /// The upstream connection may carry another request after this response.
    reusable: bool,
    /// The client connection closes after this response.
    close: bool,
}

/// The direct path's send step: the request rendered from the parsed head, sent over a
/// pooled (or new) connection; the response head read, parsed once, and rendered for the
/// client into `bufs.out`.
struct DirectExchange<'a, 'h, 'b> {
    router: &'a Router,
    req: &'a httparse::Request<'h, 'b>,
    body: &'a [u8],
    plain: &'a Plain,
    idempotent: bool,
    bufs: &'a mut Buffers,
}

impl Exchange for DirectExchange<'_, '_, '_> {
    type Answer = Answer;

    async fn send(&mut self, routed: &Routed) -> Result<Answer, SendError> {
        let cfg = &self.router.config;
        let bufs = &mut *self.bufs;
        bufs.out.clear();
        wire::write_request(
            &mut bufs.out,
            self.req,
            self.body,
            &wire::Forwarding {
                cell: routed.cell_header().as_bytes(),
                slot: routed.slot,
                epoch: routed.epoch,
                peer: &bufs.peer,
                https: cfg.tls.is_some(),
            },
        );
        let (upstream, head_len) = exchange(
            self.router,
            routed,
            &bufs.out,
            &mut bufs.upstream,
            self.idempotent,
        )
        .await?;
        let mut headers = no_headers();
        let mut resp = httparse::Response::new(&mut []);
        // A head that does not parse is a broken exchange like a cut connection.
        match parse_response(&mut resp, &bufs.upstream[..head_len], &mut headers) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err(Failure::Broken.into()),
        }
        let status = resp.code.unwrap_or(502);
        let method = self.req.method.unwrap_or("GET");
        let framing = wire::framing(method, status, resp.headers);
        let close = self.plain.close || framing == Ok(Framing::UntilClose);
        let reusable = framing
            .is_ok_and(|f| wire::upstream_reusable(resp.version.unwrap_or(0), resp.headers, f));
        bufs.out.clear();
        if framing.is_ok() {
            wire::write_response_head(
                &mut bufs.out,
                status,
                resp.reason.unwrap_or(""),
                resp.headers,
                routed.cell_header().as_bytes(),
                close,
            );
        }
        Ok(Answer {
            upstream,
            head_len,
            status,
            framing,
            reusable,
            close,
        })
    }

    fn status(answer: &Answer) -> StatusCode {
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY)
    }
}

/// Serves one request through the cell and passes the response on; true when the client
/// connection can carry another request.
async fn respond<S: AsyncWrite + Unpin>(
    router: &Router,
    client: &mut S,
    req: &httparse::Request<'_, '_>,
    body: &[u8],
    plain: &Plain,
    peer: SocketAddr,
    bufs: &mut Buffers,
) -> bool {
    let method = req.method.unwrap_or("GET");
    let target = req.path.unwrap_or("/");
    let headers: &[httparse::Header<'_>] = req.headers;
    let key = match driver::admit(router, headers, target, Some(body.len() as u64), peer) {
        Ok(k) => k,
        Err(r) => return reject(router, client, &mut bufs.out, &r, plain.close).await,
    };
    let facts = RequestFacts {
        method,
        path: target.split('?').next().unwrap_or(target),
        idempotent: http_rules::idempotent(method),
        replayable: true,
    };
    let mut exchange = DirectExchange {
        router,
        req,
        body,
        plain,
        idempotent: facts.idempotent,
        bufs,
    };
    let driven = driver::drive(router, &key, &facts, &mut exchange).await;
    let (routed, answer) = match driven {
        Ok(x) => x,
        Err(r) => return reject(router, client, &mut bufs.out, &r, plain.close).await,
    };
    let framing = match answer.framing {
        Ok(f) => f,
        Err(problem) => {
            tracing::debug!(?problem, addr = %routed.endpoint_state().addr, "cell sent an unframed response");
            let r = Rejection::new(
                StatusCode::BAD_GATEWAY,
                "bad_response",
                "the cell sent a response the router cannot pass on",
                None,
            );
            return reject(router, client, &mut bufs.out, &r, plain.close).await;
        }
    };
    let idle_ms = router.config.timeouts.idle_ms;
    let passed = pass_body(
        client,
        answer.upstream,
        framing,
        answer.head_len,
        bufs,
        idle_ms,
    )
    .await;
    match passed {
        Ok(Some(conn)) if answer.reusable => {
            routed.idle().put(conn);
            !answer.close
        }
        Ok(_) => !answer.close,
        Err(()) => false,
    }
}

/// Sends the request to the routed endpoint and reads the response head into `upbuf`:
/// the connection and the head's length. A pooled connection the cell had closed is
/// replaced by a new one when nothing came back on it and the request may be sent again.
async fn exchange(
    router: &Router,
    routed: &Routed,
    request: &[u8],
    upbuf: &mut BytesMut,
    idempotent: bool,
) -> Result<(TcpStream, usize), Failure> {
    let cfg = &router.config;
    let max_idle = Duration::from_millis(cfg.timeouts.idle_ms);
    loop {
        let pooled = routed.idle().take(max_idle);
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            None => upstream::connect(&routed.endpoint_state().addr, cfg.timeouts.connect_ms)
                .await
                .map_err(|_| Failure::Connect)?,
        };
        upbuf.clear();
        match read_head(&mut conn, request, upbuf).await {
            Ok(len) => return Ok((conn, len)),
            Err(_) if reused && upbuf.is_empty() && idempotent => continue,
            Err(_) => return Err(Failure::Broken),
        }
    }
}

/// Writes the request, then reads until a whole response head is in `upbuf` (interim 1xx
/// heads are dropped: the client did not ask for them). Only the head's end is looked
/// for here; `respond` parses it, once.
async fn read_head(
    conn: &mut TcpStream,
    request: &[u8],
    upbuf: &mut BytesMut,
) -> std::io::Result<usize> {
    use std::io::{Error, ErrorKind};
    conn.write_all(request).await?;
    loop {
        if upbuf.capacity() - upbuf.len() < 1024 {
            upbuf.reserve(READ_CHUNK);
        }
        if conn.read_buf(upbuf).await? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        while let Some(len) = wire::head_end(upbuf) {
            match wire::status_code(&upbuf[..len]) {
                Some(101) => return Err(Error::other("unrequested protocol switch")),
                Some(100..=199) => upbuf.advance(len),
                _ => return Ok(len),
            }
        }
        if upbuf.len() >= MAX_RESPONSE_HEAD {
            return Err(Error::other("response head too long"));
        }
    }
}

/// Passes the response on: the head already in `bufs.out`, then the body as it came. The
/// upstream connection back when its response ended cleanly; Err when either side broke
/// (the client connection must close: its response is cut short).
async fn pass_body<S: AsyncWrite + Unpin>(
    client: &mut S,
    mut upstream: TcpStream,
    framing: Framing,
    head_len: usize,
    bufs: &mut Buffers,
    idle_ms: u64,
) -> Result<Option<TcpStream>, ()> {
    let idle = Duration::from_millis(idle_ms);
    let Buffers {
        out,
        upstream: upbuf,
        ..
    } = bufs;
    upbuf.advance(head_len);
    let mut end = wire::BodyEnd::new(framing);
    // The first bytes of the body go out with the head, in one write.
    let first = end.feed(upbuf).map_err(drop)?;
    out.extend_from_slice(&upbuf[..first]);
    // Bytes beyond the response: the connection is out of step, never reused.
    let mut clean = upbuf.len() == first;
    client.write_all(out).await.map_err(drop)?;
    while !end.done() {
        upbuf.clear();
        upbuf.reserve(READ_CHUNK);
        let n = match timeout(idle, upstream.read_buf(upbuf)).await {
            Ok(Ok(n)) => n,
            _ => return Err(()),
        };
        if n == 0 {
            // The end of an until-close body; anything else was cut short.
            return if framing == Framing::UntilClose {
                Ok(None)
            } else {
                Err(())
            };
        }
        let pass = end.feed(upbuf).map_err(drop)?;
        clean &= pass == n;
        client.write_all(&upbuf[..pass]).await.map_err(drop)?;
    }
    Ok(clean.then_some(upstream))
}
