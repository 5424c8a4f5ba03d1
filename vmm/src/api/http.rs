//! HTTP/1.1 messages on a stream, parsed by `httparse` (hyper's parser): requests as the
//! server reads them, responses as the client reads them, each with its whole body
//! (Content-Length only; a chunked body is refused). Heads and bodies are bounded, a
//! connection carries many requests (keep-alive) unless one says `Connection: close`, and
//! `Expect: 100-continue` is answered.
//!
//! ```text
//! Reader::request(stream) -> Request { method, path, body, close } | Malformed(status, why)
//! write_response(stream, Out { status, body, .. })     (204: no body)
//! Reader::response(stream) -> Response { status, body }
//! ```

use std::io::{Read, Write};

/// Longest request or response head (request line or status line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in a head.
const MAX_HEADERS: usize = 64;

/// A request as the server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after the answer (or spoke HTTP/1.0).
    pub close: bool,
}

/// A response as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why no message could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The stream ended (cleanly, between messages, if `clean`).
    Closed {
        clean: bool,
    },
    Io(std::io::Error),
    /// The bytes are not an acceptable message: the status to answer and why.
    Malformed {
        status: u16,
        why: String,
    },
}

fn malformed(status: u16, why: impl Into<String>) -> ReadError {
    ReadError::Malformed {
        status,
        why: why.into(),
    }
}

/// Reads messages from a stream, keeping the bytes past one message for the next.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
}

/// What a head says about the body that follows it.
struct Head {
    len: usize,
    body: usize,
    close: bool,
    expect_continue: bool,
}

impl Reader {
    /// Reads one request whose body is at most `max_body` bytes; `Expect: 100-continue` is
    /// answered on `out` before its body is read.
    pub fn request(
        &mut self,
        stream: &mut impl Read,
        out: &mut impl Write,
        max_body: usize,
    ) -> Result<Request, ReadError> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let head = head(len, req.headers, req.version == Some(0), max_body)?;
                    let method = req.method.unwrap_or_default().to_string();
                    let target = req.path.unwrap_or_default();
                    let path = target.split('?').next().unwrap_or_default().to_string();
                    if head.expect_continue && self.buf.len() < len + head.body {
                        out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                            .map_err(ReadError::Io)?;
                    }
                    let body = self.body(stream, &head)?;
                    return Ok(Request {
                        method,
                        path,
                        body,
                        close: head.close,
                    });
                }
                Ok(httparse::Status::Partial) => self.fill(stream)?,
                Err(e) => return Err(malformed(400, format!("not an HTTP request: {e}"))),
            }
        }
    }

    /// Reads one response whose body is at most `max_body` bytes (interim 1xx skipped).
    pub fn response(
        &mut self,
        stream: &mut impl Read,
        max_body: usize,
    ) -> Result<Response, ReadError> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = resp.code.unwrap_or_default();
                    if (100..200).contains(&status) {
                        self.buf.drain(..len);
                        continue;
                    }
                    let mut head = head(len, resp.headers, false, max_body)?;
                    if status == 204 || status == 304 {
                        head.body = 0;
                    }
                    let body = self.body(stream, &head)?;
                    return Ok(Response { status, body });
                }
                Ok(httparse::Status::Partial) => self.fill(stream)?,
                Err(e) => return Err(malformed(502, format!("not an HTTP response: {e}"))),
            }
        }
    }

    /// Reads more bytes of a head.
    fn fill(&mut self, stream: &mut impl Read) -> Result<(), ReadError> {
        if self.buf.len() >= MAX_HEAD {
            return Err(malformed(431, format!("head longer than {MAX_HEAD} bytes")));
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => Err(ReadError::Closed {
                clean: self.buf.is_empty(),
            }),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(ReadError::Io(e)),
        }
    }

    /// The body after a head of `head.len` bytes; the bytes past it stay for the next one.
    fn body(&mut self, stream: &mut impl Read, head: &Head) -> Result<Vec<u8>, ReadError> {
        let end = head.len + head.body;
        while self.buf.len() < end {
            let mut chunk = vec![0u8; (end - self.buf.len()).min(64 * 1024)];
            match stream.read(&mut chunk) {
                Ok(0) => return Err(ReadError::Closed { clean: false }),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        let body = self.buf[head.len..end].to_vec();
        self.buf.drain(..end);
        Ok(body)
    }
}

/// The body's length and the connection's fate from a head's headers.
fn head(
    len: usize,
    headers: &[httparse::Header],
    http10: bool,
    max_body: usize,
) -> Result<Head, ReadError> {
    let mut h = Head {
        len,
        body: 0,
        close: http10,
        expect_continue: false,
    };
    let mut length = None;
    for header in headers {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| malformed(400, format!("bad Content-Length {value:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(malformed(400, "two different Content-Lengths"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(malformed(
                411,
                format!("Transfer-Encoding {value:?}: send the body with a Content-Length"),
            ));
        } else if name.eq_ignore_ascii_case("connection") {
            h.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("expect") {
            h.expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    h.body = length.unwrap_or(0);
    if h.body > max_body {
        return Err(malformed(
            413,
            format!("body of {} bytes: at most {max_body}", h.body),
        ));
    }
    Ok(h)
}

/// A response to write: `body` of `content_type` (none with 204); `close` says the
/// connection ends; `allow`, the methods a route takes (with 405).
#[derive(Debug, Clone, Copy)]
pub struct Out<'a> {
    pub status: u16,
    pub body: &'a [u8],
    pub content_type: &'a str,
    pub close: bool,
    pub allow: Option<&'a str>,
}

impl<'a> Out<'a> {
    /// A JSON body, the connection kept, no Allow.
    pub fn json(status: u16, body: &'a [u8]) -> Out<'a> {
        Out {
            status,
            body,
            content_type: "application/json",
            close: false,
            allow: None,
        }
    }
}

/// Writes a response.
pub fn write_response(out: &mut impl Write, o: Out<'_>) -> std::io::Result<()> {
    let Out {
        status,
        body,
        content_type,
        close,
        allow,
    } = o;
    // The reason phrase may be empty (RFC 9112, 4); Cloud Hypervisor's client (ch-remote)
    // reads everything after the code as the code, so it is left out.
    let mut head = format!("HTTP/1.1 {status} \r\n");
    if let Some(methods) = allow {
        head.push_str(&format!("Allow: {methods}\r\n"));
    }
    if status != 204 {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut message = head.into_bytes();
    if status != 204 {
        message.extend_from_slice(body);
    }
    out.write_all(&message)?;
    out.flush()
}

/// Writes a request with a JSON body (none when `body` is None).
pub fn write_request(
    out: &mut impl Write,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut message = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n").into_bytes();
    if let Some(b) = body {
        message.extend_from_slice(b"Content-Type: application/json\r\n");
        message.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
    }
    message.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        message.extend_from_slice(b);
    }
    out.write_all(&message)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<Request, ReadError> {
        Reader::default().request(&mut &bytes[..], &mut Vec::new(), 100)
    }

    #[test]
    fn requests_are_read_with_their_bodies_and_the_rest_kept() {
        let two = b"PUT /api/v1/vm.snapshot?x=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /a HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut r = Reader::default();
        let mut s = &two[..];
        let first = r.request(&mut s, &mut Vec::new(), 100).unwrap();
        assert_eq!(
            (first.method.as_str(), first.path.as_str(), &first.body[..]),
            ("PUT", "/api/v1/vm.snapshot", &b"{}"[..])
        );
        assert!(!first.close);
        let second = r.request(&mut s, &mut Vec::new(), 100).unwrap();
        assert_eq!((second.path.as_str(), second.close), ("/a", true));
        assert!(matches!(
            r.request(&mut s, &mut Vec::new(), 100),
            Err(ReadError::Closed { clean: true })
        ));
    }

    #[test]
    fn bad_heads_and_bodies_are_refused_with_a_status() {
        let status = |bytes: &[u8]| match read(bytes) {
            Err(ReadError::Malformed { status, .. }) => status,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: 101\r\n\r\n"),
            413
        );
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(status(b"\x00\x01 nonsense\r\n\r\n"), 400);
        let long = [b"GET / HTTP/1.1\r\nX: ".to_vec(), vec![b'a'; MAX_HEAD]].concat();
        assert_eq!(status(&long), 431);
        assert!(matches!(
            read(b"PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            Err(ReadError::Closed { clean: false })
        ));
    }

    #[test]
    fn expect_continue_is_answered_and_responses_read_back() {
        let mut out = Vec::new();
        let head = b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n";
        // The head arrives alone; the body only after the 100.
        let mut stream = Read::chain(&head[..], &b"x"[..]);
        let req = Reader::default()
            .request(&mut stream, &mut out, 10)
            .unwrap();
        assert_eq!(req.body, b"x");
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
        let mut wire = out;
        write_response(&mut wire, Out::json(204, b"ignored")).unwrap();
        let busy = Out {
            close: true,
            ..Out::json(409, br#"{"code":"busy"}"#)
        };
        write_response(&mut wire, busy).unwrap();
        let text = String::from_utf8_lossy(&wire).into_owned();
        assert!(
            text.contains("HTTP/1.1 204 \r\n"),
            "no reason phrase: {text}"
        );
        let mut r = Reader::default();
        let mut s = &wire[..];
        assert_eq!(r.response(&mut s, 100).unwrap().status, 204);
        let resp = r.response(&mut s, 100).unwrap();
        assert_eq!(
            (resp.status, &resp.body[..]),
            (409, &br#"{"code":"busy"}"#[..])
        );
    }
}
