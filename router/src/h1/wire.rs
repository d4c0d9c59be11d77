//! HTTP/1.1 on the wire for the direct path, pure: which requests it serves, the request
//! head sent upstream, the response head sent back, and where a response body ends.
//! The rules (hop-by-hop headers, forwarding headers) are the ones the hyper path applies.

use crate::http_rules::{connection_has, is_hop_by_hop, Rejection};
use std::net::IpAddr;

/// Headers the router sets itself on the way upstream; a client's own are dropped.
const ROUTER_SET: [&str; 5] = [
    "x-cellplane-cell",
    "x-cellplane-slot",
    "x-cellplane-epoch",
    "x-forwarded-for",
    "x-forwarded-proto",
];

fn value_str(value: &[u8]) -> &str {
    std::str::from_utf8(value).unwrap_or("")
}

fn named_in_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| connection_has(value_str(h.value), name))
}

/// Decides which headers are hop-by-hop for one message. `Connection` usually names only
/// `keep-alive`, `close` or `upgrade` (hop-by-hop anyway, or not header names), and then no
/// header needs to be looked up against it.
struct HopByHop<'m, 'h> {
    headers: &'m [httparse::Header<'h>],
    /// `Connection` names a header beyond the standard hop-by-hop ones.
    names_others: bool,
}

impl<'m, 'h> HopByHop<'m, 'h> {
    fn of(headers: &'m [httparse::Header<'h>]) -> Self {
        let names_others = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| value_str(h.value).split(','))
            .map(str::trim)
            .any(|t| !t.is_empty() && !t.eq_ignore_ascii_case("close") && !is_hop_by_hop(t));
        Self {
            headers,
            names_others,
        }
    }

    fn contains(&self, name: &str) -> bool {
        is_hop_by_hop(name) || (self.names_others && named_in_connection(self.headers, name))
    }
}

fn find<'h>(headers: &'h [httparse::Header<'_>], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// A parsed request the direct path serves. Everything else goes to hyper, which serves
/// the rest of the connection: HTTP/1.0, upgrades, `Expect`, chunked or large bodies,
/// targets that are not a plain path.
#[derive(Debug, PartialEq, Eq)]
pub struct Plain {
    /// Bytes of body after the head.
    pub body_len: usize,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// Whether the direct path serves this request; `None` hands it to hyper.
pub fn plain(req: &httparse::Request<'_, '_>, max_body: usize) -> Option<Plain> {
    if req.version != Some(1) || !req.path.is_some_and(|p| p.starts_with('/')) {
        return None;
    }
    let mut body_len = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // One valid length only; anything odd is hyper's to refuse.
            let n: usize = value_str(h.value).trim().parse().ok()?;
            if body_len.replace(n).is_some() {
                return None;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return None;
        }
    }
    let body_len = body_len.unwrap_or(0);
    if body_len > max_body {
        return None;
    }
    Some(Plain {
        body_len,
        close: named_in_connection(req.headers, "close"),
    })
}

/// What the router adds to a request going upstream.
pub struct Forwarding<'a> {
    pub cell: &'a [u8],
    pub slot: u32,
    pub epoch: u64,
    /// The client's address as text (see `peer_text`: rendered once per connection).
    pub peer: &'a [u8],
    pub https: bool,
}

/// The client address as it goes into `X-Forwarded-For`.
pub fn peer_text(ip: IpAddr) -> Vec<u8> {
    ip.to_string().into_bytes()
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn put_number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// The request head (and body) sent upstream: hop-by-hop and router-set headers removed,
/// `X-Forwarded-For` extended, `X-Forwarded-Proto`/`-Host` and the `X-Cellplane-*` headers
/// set. Keep-alive upstream is HTTP/1.1's default, so no `Connection` header is sent.
pub fn write_request(
    out: &mut Vec<u8>,
    req: &httparse::Request<'_, '_>,
    body: &[u8],
    fw: &Forwarding<'_>,
) {
    let headers: &[httparse::Header<'_>] = req.headers;
    let hop = HopByHop::of(headers);
    let host = find(headers, "host");
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in headers {
        if hop.contains(h.name)
            || ROUTER_SET.iter().any(|r| h.name.eq_ignore_ascii_case(r))
            || (host.is_some() && h.name.eq_ignore_ascii_case("x-forwarded-host"))
        {
            continue;
        }
        put_header(out, h.name.as_bytes(), h.value);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = find(headers, "x-forwarded-for") {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(fw.peer);
    out.extend_from_slice(b"\r\n");
    let proto: &[u8] = if fw.https { b"https" } else { b"http" };
    put_header(out, b"x-forwarded-proto", proto);
    if let Some(host) = host {
        put_header(out, b"x-forwarded-host", host);
    }
    put_header(out, b"x-cellplane-cell", fw.cell);
    out.extend_from_slice(b"x-cellplane-slot: ");
    put_number(out, u64::from(fw.slot));
    out.extend_from_slice(b"\r\nx-cellplane-epoch: ");
    put_number(out, fw.epoch);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// The length of the message head at the start of `buf` (through the empty line that ends
/// it, CRLF or bare LF), once it has all arrived. Finding the end is all that is needed
/// while reading; the head is parsed once, when complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\n') {
        let lf = from + i;
        match buf.get(lf + 1..) {
            Some([b'\n', ..]) => return Some(lf + 2),
            Some([b'\r', b'\n', ..]) => return Some(lf + 3),
            _ => from = lf + 1,
        }
    }
    None
}

/// The status code of a response head (`HTTP/1.x NNN ...`), if it has one.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let digits = head.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// How a response body is delimited (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: HEAD, 1xx, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes; the client connection closes after it too.
    UntilClose,
}

/// Why an upstream response cannot be passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadResponse {
    Length,
    Chunk,
}

/// The framing of a response to a request with `method`.
pub fn framing(
    method: &str,
    status: u16,
    headers: &[httparse::Header<'_>],
) -> Result<Framing, BadResponse> {
    if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    if let Some(te) = find(headers, "transfer-encoding") {
        let last = value_str(te).rsplit(',').next().unwrap_or("").trim();
        return Ok(if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        let n: u64 = value_str(h.value)
            .trim()
            .parse()
            .map_err(|_| BadResponse::Length)?;
        if length.replace(n).is_some_and(|m| m != n) {
            return Err(BadResponse::Length);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// Whether the upstream connection can carry another request after this response.
pub fn upstream_reusable(version: u8, headers: &[httparse::Header<'_>], framing: Framing) -> bool {
    version == 1 && framing != Framing::UntilClose && !named_in_connection(headers, "close")
}

/// The response head sent to the client: the upstream's status and headers without the
/// hop-by-hop ones (the body's own framing, `Content-Length` or chunked, is kept, since
/// the body is passed on as it came), plus `X-Cellplane-Cell`, and `Connection: close`
/// when the client connection ends after it.
pub fn write_response_head(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    headers: &[httparse::Header<'_>],
    cell: &[u8],
    close: bool,
) {
    let hop = HopByHop::of(headers);
    out.extend_from_slice(b"HTTP/1.1 ");
    put_number(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in headers {
        let framing_header = h.name.eq_ignore_ascii_case("transfer-encoding");
        if (hop.contains(h.name) && !framing_header)
            || h.name.eq_ignore_ascii_case("x-cellplane-cell")
        {
            continue;
        }
        put_header(out, h.name.as_bytes(), h.value);
    }
    put_header(out, b"x-cellplane-cell", cell);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The router's own answer on the wire.
pub fn write_rejection(out: &mut Vec<u8>, r: &Rejection, close: bool) {
    use std::io::Write;
    let body = r.body();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        r.status.as_u16(),
        r.status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some(secs) = r.retry_after_secs() {
        let _ = write!(out, "retry-after: {secs}\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

/// Where a response body ends, followed as its bytes pass through.
#[derive(Debug, Clone, Copy)]
pub struct BodyEnd {
    framing: Framing,
    /// Bytes still to come of a `Length` body.
    left: u64,
    chunked: ChunkedEnd,
    done: bool,
}

impl BodyEnd {
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunked: ChunkedEnd::default(),
            done: matches!(framing, Framing::Empty | Framing::Length(0)),
        }
    }

    /// How many of the next `bytes` belong to the body (the rest do not).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, BadResponse> {
        if self.done {
            return Ok(0);
        }
        Ok(match self.framing {
            Framing::Empty => 0,
            Framing::Length(_) => {
                let take = self.left.min(bytes.len() as u64);
                self.left -= take;
                self.done = self.left == 0;
                take as usize
            }
            Framing::Chunked => match self.chunked.feed(bytes)? {
                Some(end) => {
                    self.done = true;
                    end
                }
                None => bytes.len(),
            },
            Framing::UntilClose => bytes.len(),
        })
    }

    /// The whole body has passed (never, for an until-close body).
    pub fn done(&self) -> bool {
        self.done
    }
}

/// Follows a chunked body as it passes through, to know where it ends (so both
/// connections can be reused) without changing a byte of it.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChunkedEnd {
    state: Chunk,
}

#[derive(Debug, Default, Clone, Copy)]
enum Chunk {
    #[default]
    SizeStart,
    Size {
        value: u64,
        extension: bool,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    Trailer {
        line: usize,
    },
    TrailerLf {
        line: usize,
    },
    Done,
}

/// Longest trailer line accepted.
const MAX_TRAILER_LINE: usize = 8 * 1024;

impl ChunkedEnd {
    /// Feeds the next bytes of the body; `Some(n)` when the body ends after `n` of them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, BadResponse> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                Chunk::Data(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == left {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left - take)
                    };
                    continue;
                }
                Chunk::SizeStart => match hex(b) {
                    Some(d) => Chunk::Size {
                        value: d,
                        extension: false,
                    },
                    None => return Err(BadResponse::Chunk),
                },
                Chunk::Size { value, extension } => match (b, hex(b)) {
                    (b'\r', _) => Chunk::SizeLf { value },
                    (_, _) if extension => Chunk::Size { value, extension },
                    (_, Some(d)) if value >> 60 == 0 => Chunk::Size {
                        value: value << 4 | d,
                        extension,
                    },
                    (b';' | b' ' | b'\t', _) => Chunk::Size {
                        value,
                        extension: true,
                    },
                    _ => return Err(BadResponse::Chunk),
                },
                Chunk::SizeLf { value } => match (b, value) {
                    (b'\n', 0) => Chunk::Trailer { line: 0 },
                    (b'\n', n) => Chunk::Data(n),
                    _ => return Err(BadResponse::Chunk),
                },
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::SizeStart,
                Chunk::DataCr | Chunk::DataLf => return Err(BadResponse::Chunk),
                Chunk::Trailer { line } if b == b'\r' => Chunk::TrailerLf { line },
                Chunk::Trailer { line } if line < MAX_TRAILER_LINE => {
                    Chunk::Trailer { line: line + 1 }
                }
                Chunk::Trailer { .. } => return Err(BadResponse::Chunk),
                Chunk::TrailerLf { line: 0 } if b == b'\n' => {
                    self.state = Chunk::Done;
                    return Ok(Some(i + 1));
                }
                Chunk::TrailerLf { .. } if b == b'\n' => Chunk::Trailer { line: 0 },
                Chunk::TrailerLf { .. } => return Err(BadResponse::Chunk),
                Chunk::Done => return Ok(Some(i)),
            };
            i += 1;
        }
        Ok(matches!(self.state, Chunk::Done).then_some(bytes.len()))
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<'h, 'b>(
        raw: &'b [u8],
        headers: &'h mut [httparse::Header<'b>],
    ) -> httparse::Request<'h, 'b> {
        let mut req = httparse::Request::new(headers);
        assert!(req.parse(raw).unwrap().is_complete());
        req
    }

    #[test]
    fn plain_requests_are_served_directly_others_go_to_hyper() {
        let mut h = [httparse::EMPTY_HEADER; 16];
        let simple = parse(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", &mut h);
        assert_eq!(
            plain(&simple, 100),
            Some(Plain {
                body_len: 0,
                close: false
            })
        );
        let mut h = [httparse::EMPTY_HEADER; 16];
        let post = parse(
            b"POST /a HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
            &mut h,
        );
        assert_eq!(
            plain(&post, 100),
            Some(Plain {
                body_len: 5,
                close: true
            })
        );
        for raw in [
            &b"GET /a HTTP/1.0\r\n\r\n"[..],
            b"GET http://x/a HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 101\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"POST /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ] {
            let mut h = [httparse::EMPTY_HEADER; 16];
            let req = parse(raw, &mut h);
            assert_eq!(plain(&req, 100), None, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn upstream_request_drops_hop_by_hop_and_spoofed_headers() {
        let raw = b"GET /p?q=1 HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive, x-secret\r\n\
            X-Secret: 1\r\nKeep-Alive: 5\r\nX-Cellplane-Cell: evil\r\nX-Forwarded-For: 1.2.3.4\r\n\
            X-Forwarded-Host: spoof\r\nX-Forwarded-Proto: https\r\nX-User-Id: u1\r\n\r\n";
        let mut h = [httparse::EMPTY_HEADER; 16];
        let req = parse(raw, &mut h);
        let mut out = Vec::new();
        let fw = Forwarding {
            cell: b"cell-a",
            slot: 7,
            epoch: 3,
            peer: b"10.0.0.9",
            https: false,
        };
        write_request(&mut out, &req, b"", &fw);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p?q=1 HTTP/1.1\r\nHost: shop\r\nX-User-Id: u1\r\n\
             x-forwarded-for: 1.2.3.4, 10.0.0.9\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: shop\r\nx-cellplane-cell: cell-a\r\nx-cellplane-slot: 7\r\n\
             x-cellplane-epoch: 3\r\n\r\n"
        );
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let cl = [httparse::Header {
            name: "Content-Length",
            value: b"12",
        }];
        let te = [httparse::Header {
            name: "Transfer-Encoding",
            value: b"gzip, chunked",
        }];
        let te_other = [httparse::Header {
            name: "Transfer-Encoding",
            value: b"gzip",
        }];
        let two = [
            httparse::Header {
                name: "Content-Length",
                value: b"1",
            },
            httparse::Header {
                name: "content-length",
                value: b"2",
            },
        ];
        assert_eq!(framing("GET", 200, &cl), Ok(Framing::Length(12)));
        assert_eq!(framing("HEAD", 200, &cl), Ok(Framing::Empty));
        assert_eq!(framing("GET", 204, &[]), Ok(Framing::Empty));
        assert_eq!(framing("GET", 304, &cl), Ok(Framing::Empty));
        assert_eq!(framing("GET", 200, &te), Ok(Framing::Chunked));
        assert_eq!(framing("GET", 200, &te_other), Ok(Framing::UntilClose));
        assert_eq!(framing("GET", 200, &[]), Ok(Framing::UntilClose));
        assert_eq!(framing("GET", 200, &two), Err(BadResponse::Length));
        assert!(upstream_reusable(1, &cl, Framing::Length(12)));
        assert!(!upstream_reusable(0, &cl, Framing::Length(12)));
        assert!(!upstream_reusable(1, &[], Framing::UntilClose));
        let close = [httparse::Header {
            name: "Connection",
            value: b"close",
        }];
        assert!(!upstream_reusable(1, &close, Framing::Length(0)));
    }

    #[test]
    fn response_head_keeps_framing_and_names_the_cell() {
        let headers = [
            httparse::Header {
                name: "Content-Type",
                value: b"text/plain",
            },
            httparse::Header {
                name: "Transfer-Encoding",
                value: b"chunked",
            },
            httparse::Header {
                name: "Connection",
                value: b"keep-alive",
            },
            httparse::Header {
                name: "X-Cellplane-Cell",
                value: b"spoof",
            },
        ];
        let mut out = Vec::new();
        write_response_head(&mut out, 200, "OK", &headers, b"a", true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\
             x-cellplane-cell: a\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn the_head_end_and_status_are_found_without_a_parse() {
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"), Some(25));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\nA: b\n\nbody"), Some(22));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n"), None);
        assert_eq!(head_end(b""), None);
        assert_eq!(status_code(b"HTTP/1.1 103 Early Hints\r\n"), Some(103));
        assert_eq!(status_code(b"HTTP/1.0 404 Not Found\r\n"), Some(404));
        assert_eq!(status_code(b"HTTP/2 200\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 2x0\r\n"), None);
    }

    #[test]
    fn body_end_splits_the_body_from_what_follows() {
        let mut length = BodyEnd::new(Framing::Length(5));
        assert_eq!(length.feed(b"hel").unwrap(), 3);
        assert!(!length.done());
        assert_eq!(length.feed(b"loEXTRA").unwrap(), 2);
        assert!(length.done());
        let mut empty = BodyEnd::new(Framing::Empty);
        assert!(empty.done());
        assert_eq!(empty.feed(b"x").unwrap(), 0);
        let mut chunked = BodyEnd::new(Framing::Chunked);
        assert_eq!(chunked.feed(b"2\r\nab\r\n").unwrap(), 7);
        assert_eq!(chunked.feed(b"0\r\n\r\nNEXT").unwrap(), 5);
        assert!(chunked.done());
        let mut until_close = BodyEnd::new(Framing::UntilClose);
        assert_eq!(until_close.feed(b"abc").unwrap(), 3);
        assert!(!until_close.done());
    }

    #[test]
    fn chunked_end_is_found_across_any_split() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in 0..=body.len() {
            let mut end = ChunkedEnd::default();
            let (a, b) = body.split_at(split);
            let found = match end.feed(a).unwrap() {
                Some(n) => n,
                None => split + end.feed(b).unwrap().expect("ends in the second part"),
            };
            assert_eq!(found, body.len(), "split at {split}");
        }
        let mut end = ChunkedEnd::default();
        assert_eq!(end.feed(b"0\r\n\r\nextra").unwrap(), Some(5));
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"5\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(ChunkedEnd::default().feed(bad).is_err(), "{bad:?}");
        }
    }
}
