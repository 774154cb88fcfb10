//! HTTP/1.1 as it is on the wire, for the forwarding path: heads parsed in
//! place, the framing of bodies (RFC 9112 §6), a chunked body followed to
//! its end without decoding it, and heads written out for the next hop.
//!
//! Bodies pass through as they came, chunks and trailers included, so the
//! only thing the proxy must agree on with both peers is where a message
//! ends. Anything ambiguous there (a length and chunks together, lengths
//! that disagree, a malformed chunk) is refused rather than guessed, which
//! is what keeps requests from being smuggled past the proxy.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// A head larger than this is refused (431).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
const MAX_FIELDS: usize = 128;
/// A chunk-size line (with its extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// Trailers larger than this are refused.
const MAX_TRAILERS: usize = 64 * 1024;

/// What is wrong with a message's head or framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WireError {
    /// The head is over [`MAX_HEAD`] or has over [`MAX_FIELDS`] fields.
    TooLarge,
    /// Not HTTP/1.x: the caller may hand the bytes to a server that speaks
    /// it (HTTP/2's preface parses as a version error).
    Version,
    /// Malformed: says what.
    Invalid(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::TooLarge => write!(f, "the head is over {MAX_HEAD} bytes or {MAX_FIELDS} fields"),
            WireError::Version => f.write_str("not HTTP/1.x"),
            WireError::Invalid(what) => f.write_str(what),
        }
    }
}

impl From<httparse::Error> for WireError {
    fn from(e: httparse::Error) -> WireError {
        match e {
            httparse::Error::Version => WireError::Version,
            httparse::Error::TooManyHeaders => WireError::TooLarge,
            e => WireError::Invalid(format!("malformed head: {e}")),
        }
    }
}

/// A head's fields, as byte ranges into the head itself: parsing allocates
/// one small list and copies nothing.
#[derive(Debug)]
pub(crate) struct Fields {
    bytes: Bytes,
    list: Vec<(Range<usize>, Range<usize>)>,
}

/// Where `part` lies in `whole`, which holds it.
fn range_in(whole: &[u8], part: &[u8]) -> Range<usize> {
    if part.is_empty() {
        return 0..0;
    }
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// The ranges of parsed fields in the buffer they were parsed from.
fn field_ranges(buf: &[u8], parsed: &[httparse::Header<'_>]) -> Vec<(Range<usize>, Range<usize>)> {
    parsed
        .iter()
        .map(|h| (range_in(buf, h.name.as_bytes()), range_in(buf, h.value)))
        .collect()
}

impl Fields {
    /// The whole head.
    pub(crate) fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Names (as sent; compare without case) and values.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.list.iter().map(|(name, value)| {
            // httparse accepts only token characters in names.
            let name = std::str::from_utf8(&self.bytes[name.clone()]).unwrap_or("");
            (name, &self.bytes[value.clone()])
        })
    }

    /// Every value of the field `name`.
    pub(crate) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub(crate) fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v)
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The comma-separated elements of every value of `name`, trimmed.
    fn elements<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.all(name)
            .flat_map(|v| v.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
    }

    /// Whether `name`'s elements include `token` (without case).
    pub(crate) fn lists(&self, name: &str, token: &str) -> bool {
        self.elements(name).any(|e| e.eq_ignore_ascii_case(token.as_bytes()))
    }
}

/// Fields about one hop only, so never passed on: the connection's own (RFC
/// 9110 §7.6.1). `Transfer-Encoding` passes, since bodies pass as they are.
pub(crate) const HOP_BY_HOP: [&str; 5] = ["connection", "keep-alive", "proxy-connection", "te", "upgrade"];

/// A request's head.
#[derive(Debug)]
pub(crate) struct RequestHead {
    method: Range<usize>,
    target: Range<usize>,
    /// 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub(crate) minor: u8,
    pub(crate) fields: Fields,
}

impl RequestHead {
    pub(crate) fn method(&self) -> &str {
        std::str::from_utf8(&self.fields.bytes[self.method.clone()]).unwrap_or("")
    }

    pub(crate) fn target(&self) -> &str {
        std::str::from_utf8(&self.fields.bytes[self.target.clone()]).unwrap_or("")
    }

    /// Whether the request may be sent twice without harm (RFC 9110
    /// §9.2.2): a request of these methods may be retried on a fresh
    /// connection after a kept-alive one closed under it.
    pub(crate) fn idempotent(&self) -> bool {
        matches!(self.method(), "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
    }
}

/// The length of a head if it has come whole, within [`MAX_HEAD`].
fn head_len(parsed: httparse::Status<usize>, buffered: usize) -> Result<Option<usize>, WireError> {
    match parsed {
        httparse::Status::Complete(len) if len <= MAX_HEAD => Ok(Some(len)),
        httparse::Status::Partial if buffered <= MAX_HEAD => Ok(None),
        _ => Err(WireError::TooLarge),
    }
}

/// Takes a whole request head off the front of `buf`; `None` until one has
/// arrived.
pub(crate) fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, WireError> {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut parsed);
    let Some(len) = head_len(req.parse(buf)?, buf.len())? else {
        return Ok(None);
    };
    let method = range_in(buf, req.method.unwrap_or("").as_bytes());
    let target = range_in(buf, req.path.unwrap_or("").as_bytes());
    let minor = req.version.unwrap_or(1);
    let list = field_ranges(buf, req.headers);
    // The ranges are offsets from the buffer's start, where the head starts.
    let bytes = buf.split_to(len).freeze();
    Ok(Some(RequestHead {
        method,
        target,
        minor,
        fields: Fields { bytes, list },
    }))
}

/// A response's head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) code: u16,
    reason: Range<usize>,
    pub(crate) minor: u8,
    pub(crate) fields: Fields,
}

impl ResponseHead {
    pub(crate) fn reason(&self) -> &[u8] {
        &self.fields.bytes[self.reason.clone()]
    }

    /// An interim answer (100 Continue, 103 Early Hints): a final one follows.
    pub(crate) fn interim(&self) -> bool {
        (100..200).contains(&self.code) && self.code != 101
    }
}

/// Takes a whole response head off the front of `buf`; `None` until one
/// has arrived.
pub(crate) fn parse_response(buf: &mut BytesMut) -> Result<Option<ResponseHead>, WireError> {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut parsed);
    let Some(len) = head_len(resp.parse(buf)?, buf.len())? else {
        return Ok(None);
    };
    let reason = range_in(buf, resp.reason.unwrap_or("").as_bytes());
    let (code, minor) = (resp.code.unwrap_or(0), resp.version.unwrap_or(1));
    let list = field_ranges(buf, resp.headers);
    let bytes = buf.split_to(len).freeze();
    Ok(Some(ResponseHead {
        code,
        reason,
        minor,
        fields: Fields { bytes, list },
    }))
}

/// Where a body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// There is none.
    Empty,
    /// After this many bytes.
    Length(u64),
    /// After the last chunk and the trailers.
    Chunked,
    /// When the sender closes the connection (responses only).
    UntilClose,
}

/// The one `Content-Length` the fields agree on, if any.
fn content_length(fields: &Fields) -> Result<Option<u64>, WireError> {
    let mut length = None;
    for element in fields.elements("content-length") {
        let n = std::str::from_utf8(element)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| WireError::Invalid(format!("bad Content-Length {:?}", String::from_utf8_lossy(element))))?;
        if length.is_some_and(|l| l != n) {
            return Err(WireError::Invalid("Content-Length values that disagree".into()));
        }
        length = Some(n);
    }
    Ok(length)
}

/// Whether `Transfer-Encoding` ends with `chunked`, or `None` without one.
fn chunked(fields: &Fields) -> Option<bool> {
    let last = fields.elements("transfer-encoding").filter(|e| !e.is_empty()).last()?;
    Some(last.eq_ignore_ascii_case(b"chunked"))
}

/// Where a request's body ends (RFC 9112 §6.3). A request may not be
/// framed two ways or by a coding the proxy can't follow: any
/// `Transfer-Encoding` (even an empty one) must be exactly `chunked`, and
/// comes without a `Content-Length`.
pub(crate) fn request_framing(fields: &Fields) -> Result<Framing, WireError> {
    let length = content_length(fields)?;
    if !fields.has("transfer-encoding") {
        return Ok(match length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        });
    }
    if length.is_some() {
        return Err(WireError::Invalid(
            "both Content-Length and Transfer-Encoding: send one of them".into(),
        ));
    }
    let mut codings = fields.elements("transfer-encoding");
    match (codings.next(), codings.next()) {
        (Some(coding), None) if coding.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
        _ => Err(WireError::Invalid(
            "a Transfer-Encoding other than chunked: send the body chunked or with a Content-Length".into(),
        )),
    }
}

/// Where a response's body ends (RFC 9112 §6.3), given whether it answers
/// a HEAD.
pub(crate) fn response_framing(head: &ResponseHead, to_head: bool) -> Result<Framing, WireError> {
    if to_head || (100..200).contains(&head.code) || head.code == 204 || head.code == 304 {
        return Ok(Framing::Empty);
    }
    match chunked(&head.fields) {
        Some(true) => Ok(Framing::Chunked),
        Some(false) => Ok(Framing::UntilClose),
        None => Ok(match content_length(&head.fields)? {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }),
    }
}

/// Follows a chunked body as it passes, to find its end.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    state: ChunkState,
    /// Bytes of the current size line, or of the trailers.
    line: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// At a chunk's size, before its first digit.
    #[default]
    SizeStart,
    /// In a chunk's size: its value so far.
    Size(u64),
    /// After the size: spaces, then extensions or the line's end.
    SizeEnd(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// Where a chunk's size line goes after its digits, at `b`; `None` if `b`
/// can't follow them.
fn after_size(n: u64, b: u8) -> Option<ChunkState> {
    match b {
        b' ' | b'\t' => Some(ChunkState::SizeEnd(n)),
        b';' => Some(ChunkState::Extension(n)),
        b'\r' => Some(ChunkState::SizeLf(n)),
        _ => None,
    }
}

impl Chunks {
    pub(crate) fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Follows `input`; says how much of it is this body (all of it, or up
    /// to the end of the body).
    pub(crate) fn advance(&mut self, input: &[u8]) -> Result<usize, WireError> {
        use ChunkState::*;
        let bad = |what: &str| Err(WireError::Invalid(format!("malformed chunked body: {what}")));
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            let mut step = 1;
            self.state = match self.state {
                SizeStart => match (b as char).to_digit(16) {
                    Some(d) => Size(u64::from(d)),
                    None => return bad("a chunk without a size"),
                },
                Size(n) => match (b as char).to_digit(16) {
                    Some(_) if n >> 56 != 0 => return bad("a chunk size too large"),
                    Some(d) => Size(n << 4 | u64::from(d)),
                    None => match after_size(n, b) {
                        Some(next) => next,
                        None => return bad("a chunk size that is not hexadecimal"),
                    },
                },
                SizeEnd(n) => match after_size(n, b) {
                    Some(next) => next,
                    None => return bad("text after a chunk size"),
                },
                Extension(n) => match b {
                    b'\r' => SizeLf(n),
                    b'\n' => return bad("a bare LF in a chunk extension"),
                    _ => Extension(n),
                },
                SizeLf(n) => match b {
                    b'\n' if n == 0 => TrailerStart,
                    b'\n' => Data(n),
                    _ => return bad("a CR without LF after a chunk size"),
                },
                Data(n) => {
                    let take = n.min((input.len() - i) as u64);
                    step = take as usize;
                    if take == n { DataCr } else { Data(n - take) }
                }
                DataCr => match b {
                    b'\r' => DataLf,
                    _ => return bad("a chunk longer than its size"),
                },
                DataLf => match b {
                    b'\n' => SizeStart,
                    _ => return bad("a CR without LF after a chunk"),
                },
                TrailerStart => match b {
                    b'\r' => EndLf,
                    b'\n' => return bad("a bare LF in the trailers"),
                    _ => Trailer,
                },
                Trailer => match b {
                    b'\r' => TrailerLf,
                    b'\n' => return bad("a bare LF in the trailers"),
                    _ => Trailer,
                },
                TrailerLf => match b {
                    b'\n' => TrailerStart,
                    _ => return bad("a CR without LF in the trailers"),
                },
                EndLf => match b {
                    b'\n' => {
                        self.state = Done;
                        return Ok(i + 1);
                    }
                    _ => return bad("a CR without LF at the end"),
                },
                Done => return Ok(i),
            };
            match self.state {
                SizeStart | Size(_) | SizeEnd(_) | Extension(_) | SizeLf(_) => {
                    self.line += step;
                    if self.line > MAX_CHUNK_LINE {
                        return bad("a chunk-size line over 4 KiB");
                    }
                }
                TrailerStart | Trailer | TrailerLf | EndLf => {
                    self.line += step;
                    if self.line > MAX_TRAILERS {
                        return bad("trailers over 64 KiB");
                    }
                }
                _ => self.line = 0,
            }
            i += step;
        }
        Ok(i)
    }
}

/// Where one body ends, followed as its bytes pass.
#[derive(Debug)]
pub(crate) struct BodyEnd {
    framing: Framing,
    /// Of a body with a length: bytes still to come.
    left: u64,
    chunks: Chunks,
    /// The sender closed the connection: the end of a body that ends so.
    closed: bool,
}

impl BodyEnd {
    pub(crate) fn new(framing: Framing) -> BodyEnd {
        BodyEnd {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunks: Chunks::default(),
            closed: false,
        }
    }

    /// How much of `buf`, the bytes that came next, is this body's.
    pub(crate) fn take(&mut self, buf: &[u8]) -> Result<usize, WireError> {
        Ok(match self.framing {
            Framing::Empty => 0,
            Framing::Length(_) => {
                let n = self.left.min(buf.len() as u64);
                self.left -= n;
                n as usize
            }
            Framing::Chunked => self.chunks.advance(buf)?,
            Framing::UntilClose => buf.len(),
        })
    }

    /// The sender closed the connection; says whether that ends the body
    /// well.
    pub(crate) fn close(&mut self) -> bool {
        self.closed = true;
        self.framing == Framing::UntilClose
    }

    pub(crate) fn done(&self) -> bool {
        match self.framing {
            Framing::Empty => true,
            Framing::Length(_) => self.left == 0,
            Framing::Chunked => self.chunks.done(),
            Framing::UntilClose => self.closed,
        }
    }
}

/// Whether a head's final empty line may be in `buf`, looking only at what
/// came since `seen` bytes: heads are parsed once they can be whole, not
/// again on every read of one that trickles in.
pub(crate) fn may_end_head(buf: &[u8], seen: usize) -> bool {
    let from = seen.saturating_sub(3).min(buf.len());
    buf[from..].windows(2).any(|w| w == b"\n\n") || buf[from..].windows(3).any(|w| w == b"\n\r\n")
}

/// Writes `head`'s fields into `out` (`name: value\r\n` each), but for
/// hop-by-hop ones (those of [`HOP_BY_HOP`] and any that `Connection`
/// names) and those `skip` refuses. `Connection` can't name the fields
/// that route and frame a message: the callers write those themselves.
pub(crate) fn put_fields(out: &mut BytesMut, fields: &Fields, skip: impl Fn(&str) -> bool) {
    const FRAMING: [&str; 3] = ["host", "content-length", "transfer-encoding"];
    // Most requests name none: no allocation then.
    let named: Vec<&[u8]> = fields
        .elements("connection")
        .filter(|n| !FRAMING.iter().any(|f| n.eq_ignore_ascii_case(f.as_bytes())))
        .collect();
    for (name, value) in fields.iter() {
        let hop = HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
            || named.iter().any(|n| n.eq_ignore_ascii_case(name.as_bytes()));
        if !hop && !skip(name) {
            put_field(out, name, value);
        }
    }
}

/// The fields that ask for an upgrade: the head's `Upgrade` values and
/// `Connection: upgrade` (both hop-by-hop, so [`put_fields`] leaves them).
pub(crate) fn put_upgrade(out: &mut BytesMut, fields: &Fields) {
    for value in fields.all("upgrade") {
        put_field(out, "upgrade", value);
    }
    put_field(out, "connection", b"upgrade");
}

pub(crate) fn put_field(out: &mut BytesMut, name: &str, value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Result<Option<RequestHead>, WireError> {
        parse_request(&mut BytesMut::from(text))
    }

    fn framing(text: &str) -> Result<Framing, WireError> {
        request_framing(&request(text).unwrap().expect("a whole head").fields)
    }

    #[test]
    fn a_head_is_taken_off_the_front() {
        let mut buf = BytesMut::from("GET /a?b HTTP/1.1\r\nHost: x.localhost\r\nX-A: 1\r\nx-a: 2\r\n\r\nGET /next");
        let head = parse_request(&mut buf).unwrap().unwrap();
        assert_eq!((head.method(), head.target(), head.minor), ("GET", "/a?b", 1));
        assert_eq!(head.fields.get("host"), Some(&b"x.localhost"[..]));
        assert_eq!(head.fields.all("X-A").collect::<Vec<_>>(), [b"1", b"2"]);
        assert_eq!(&buf[..], b"GET /next", "what follows stays");
        assert!(parse_request(&mut buf).unwrap().is_none(), "partial");
        assert_eq!(
            request("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap_err(),
            WireError::Version
        );
        assert!(matches!(
            request("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            Err(WireError::Invalid(_))
        ));
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(request(&huge).unwrap_err(), WireError::TooLarge);
    }

    #[test]
    fn a_response_head_keeps_its_reason() {
        let mut buf = BytesMut::from("HTTP/1.1 404 Not Here\r\nContent-Length: 3\r\n\r\nabc");
        let head = parse_response(&mut buf).unwrap().unwrap();
        assert_eq!((head.code, head.reason(), head.minor), (404, &b"Not Here"[..], 1));
        assert_eq!(response_framing(&head, false), Ok(Framing::Length(3)));
        assert_eq!(response_framing(&head, true), Ok(Framing::Empty), "to a HEAD");
        assert_eq!(&buf[..], b"abc");
    }

    #[test]
    fn request_framing_refuses_what_could_be_read_two_ways() {
        assert_eq!(framing("GET / HTTP/1.1\r\n\r\n"), Ok(Framing::Empty));
        assert_eq!(
            framing("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nContent-Length: 12\r\nContent-Length: 12, 12\r\n\r\n"),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 12\r\nContent-Length: 13\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +12\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked,\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding:\r\nContent-Length: 30\r\n\r\n",
        ] {
            assert!(matches!(framing(bad), Err(WireError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn response_framing_follows_the_status_and_fields() {
        let framing = |text: &str| {
            let head = parse_response(&mut BytesMut::from(text)).unwrap().unwrap();
            response_framing(&head, false)
        };
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
            Ok(Framing::Empty)
        );
        assert_eq!(framing("HTTP/1.1 304 Not Modified\r\n\r\n"), Ok(Framing::Empty));
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), Ok(Framing::UntilClose));
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 4\r\n\r\n"),
            Ok(Framing::UntilClose)
        );
    }

    #[test]
    fn chunks_are_followed_to_their_end_in_any_pieces() {
        let body = b"5;ext=1\r\nhello\r\n10 \r\n0123456789abcdef\r\n0\r\nX-Sum: 9\r\n\r\nNEXT";
        let end = body.len() - 4;
        let mut whole = Chunks::default();
        assert_eq!(whole.advance(body), Ok(end));
        assert!(whole.done());
        // Byte by byte, the same end.
        let mut bytewise = Chunks::default();
        let mut taken = 0;
        for b in body.chunks(1) {
            taken += bytewise.advance(b).unwrap();
            if bytewise.done() {
                break;
            }
        }
        assert_eq!(taken, end);
        let mut empty = Chunks::default();
        assert_eq!(empty.advance(b"0\r\n\r\n"), Ok(5));
        assert!(empty.done());
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"\r\n"[..],
            b"5\r\nhelloX",
            b"5\nhello\r\n",
            b"g\r\n",
            b"5 x\r\n",
            b"0\r\nX: 1\n\r\n",
            b"fffffffffffffffff\r\n",
        ] {
            let mut chunks = Chunks::default();
            assert!(chunks.advance(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut long = Chunks::default();
        let line = [b"1;".as_slice(), &[b'a'; MAX_CHUNK_LINE]].concat();
        assert!(long.advance(&line).is_err(), "a size line without end");
    }

    #[test]
    fn hop_by_hop_fields_include_those_connection_names() {
        let head = request("GET / HTTP/1.1\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTransfer-Encoding: chunked\r\nX-Kept: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        let mut out = BytesMut::new();
        put_fields(&mut out, &head.fields, |_| false);
        assert_eq!(&out[..], b"Transfer-Encoding: chunked\r\nX-Kept: 2\r\n");
        // Naming the fields that frame or route it does not drop them.
        let head = request("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nConnection: content-length, host, Transfer-Encoding\r\n\r\n")
            .unwrap()
            .unwrap();
        let mut out = BytesMut::new();
        put_fields(&mut out, &head.fields, |_| false);
        assert_eq!(&out[..], b"Host: a\r\nContent-Length: 4\r\n");
    }

    #[test]
    fn a_body_end_is_found_for_each_framing() {
        let mut length = BodyEnd::new(Framing::Length(5));
        assert_eq!((length.take(b"abc").unwrap(), length.done()), (3, false));
        assert_eq!((length.take(b"defgh").unwrap(), length.done()), (2, true));
        let mut until_close = BodyEnd::new(Framing::UntilClose);
        assert_eq!(until_close.take(b"abc").unwrap(), 3);
        assert!(!until_close.done() && until_close.close() && until_close.done());
        assert!(!BodyEnd::new(Framing::Length(1)).close(), "a length cut short");
        let mut chunked = BodyEnd::new(Framing::Chunked);
        assert_eq!(chunked.take(b"1\r\na\r\n0\r\n\r\nGET").unwrap(), 11);
        assert!(chunked.done());
        assert!(BodyEnd::new(Framing::Empty).done());
    }

    #[test]
    fn a_head_is_parsed_only_once_it_can_be_whole() {
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
        assert!(may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0));
        // The blank line straddles the last read.
        assert!(may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 26));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HT", 34));
        assert!(may_end_head(b"GET / HTTP/1.1\nHost: a\n\n", 20));
    }
}

/// The wire parsers face clients and machines nobody vouches for: no input
/// makes them panic, and a chunked body split anywhere is followed alike.
#[cfg(test)]
mod properties {
    use bytes::BytesMut;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn heads_of_any_bytes_parse_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_request(&mut BytesMut::from(&bytes[..]));
            let _ = parse_response(&mut BytesMut::from(&bytes[..]));
        }

        #[test]
        fn chunks_split_anywhere_end_at_the_same_place(
            sizes in proptest::collection::vec(1usize..300, 0..6),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
        ) {
            let mut body = Vec::new();
            for n in &sizes {
                body.extend(format!("{n:x}\r\n").into_bytes());
                body.extend(std::iter::repeat_n(b'x', *n));
                body.extend(b"\r\n");
            }
            body.extend(b"0\r\n\r\nextra");
            let end = body.len() - "extra".len();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(body.len())).collect();
            points.push(0);
            points.push(body.len());
            points.sort_unstable();
            let mut chunks = Chunks::default();
            let mut taken = 0;
            for w in points.windows(2) {
                if chunks.done() {
                    break;
                }
                taken += chunks.advance(&body[w[0]..w[1]]).unwrap();
            }
            prop_assert!(chunks.done());
            prop_assert_eq!(taken, end);
        }

        #[test]
        fn chunks_of_any_bytes_follow_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = Chunks::default().advance(&bytes);
        }
    }
}
