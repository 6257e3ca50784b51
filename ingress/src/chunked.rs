//! The HTTP/1.1 chunked transfer coding (RFC 9112 §7.1), decoded
//! incrementally from a read buffer, and its encoding.
//!
//! Strict on purpose: line ends must be CRLF and chunk sizes plain hex, so
//! that nothing a backend sends can be read two ways (response splitting).
//! Trailer fields are passed on (parsed by `httparse`), except those that
//! RFC 9110 §6.5.1 forbids in trailers: framing, routing, authentication
//! and connection control.
#![deny(clippy::disallowed_methods)]

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most trailer bytes accepted.
const MAX_TRAILERS: usize = 16 * 1024;
/// Most trailer fields accepted.
const MAX_TRAILER_FIELDS: usize = 64;

/// What the decoder got out of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes.
    Data(Bytes),
    /// The buffer holds no complete next element: read more.
    NeedMore,
    /// The last chunk and the trailers are consumed; the trailer fields
    /// that may be passed on, if there are any.
    End(Option<HeaderMap>),
}

/// Whether `name` may not travel as a trailer field (RFC 9110 §6.5.1):
/// it frames or routes the message, authenticates it, or controls the
/// connection.
#[must_use]
pub fn forbidden_in_trailers(name: &HeaderName) -> bool {
    [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONTENT_ENCODING,
        header::CONTENT_TYPE,
        header::CONTENT_RANGE,
        header::HOST,
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::AUTHORIZATION,
        header::PROXY_AUTHORIZATION,
        header::SET_COOKIE,
        header::COOKIE,
        header::CACHE_CONTROL,
        header::EXPECT,
    ]
    .contains(name)
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// The trailer section after a last chunk: the fields that may be sent
/// (see [`forbidden_in_trailers`]), then the empty line.
#[must_use]
pub fn encode_trailers(trailers: &HeaderMap) -> Bytes {
    let mut out = BytesMut::new();
    for (name, value) in trailers {
        if forbidden_in_trailers(name) {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

/// Parses a trailer section (every line with its CRLF, the empty line
/// included) into the fields that may be passed on.
fn parse_trailers(section: &[u8]) -> Result<Option<HeaderMap>, &'static str> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
    let parsed = match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => fields,
        Ok(httparse::Status::Partial) => return Err("the trailers are incomplete"),
        Err(httparse::Error::TooManyHeaders) => return Err("too many trailer fields"),
        Err(_) => return Err("a trailer field is malformed"),
    };
    let mut map = HeaderMap::new();
    for field in parsed {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| "a trailer field name is malformed")?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| "a trailer field value is malformed")?;
        if !forbidden_in_trailers(&name) {
            map.append(name, value);
        }
    }
    Ok((!map.is_empty()).then_some(map))
}

#[derive(Clone, Copy, Debug)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

/// An incremental decoder.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// The trailer section read so far.
    trailers: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            state: State::Size,
            trailers: Vec::new(),
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Parses `1a;ext=x` → 26: hex digits, optional whitespace, optional
/// extensions (ignored).
fn parse_size(line: &[u8]) -> Result<u64, &'static str> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err("a chunk size is not hexadecimal");
    }
    if digits > 15 {
        return Err("a chunk size is too large");
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count()..];
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err("a chunk size line is malformed");
    }
    let text = std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII");
    u64::from_str_radix(text, 16).map_err(|_| "a chunk size is too large")
}

impl Decoder {
    /// Whether the last chunk and trailers have been consumed.
    #[must_use]
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Decodes the next element from the front of `buf`.
    ///
    /// # Errors
    /// A description of the framing error; the connection must be dropped.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, &'static str> {
        loop {
            match self.state {
                State::Size => {
                    let Some(end) = find_crlf(buf) else {
                        return if buf.len() > MAX_LINE {
                            Err("a chunk size line is too long")
                        } else {
                            Ok(Step::NeedMore)
                        };
                    };
                    let size = parse_size(&buf[..end])?;
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(Step::Data(data));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("a chunk is longer than its size");
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers(seen) => {
                    let Some(end) = find_crlf(buf) else {
                        return if buf.len() > MAX_LINE {
                            Err("a trailer line is too long")
                        } else {
                            Ok(Step::NeedMore)
                        };
                    };
                    let seen = seen + end + 2;
                    if seen > MAX_TRAILERS {
                        return Err("the trailers are too large");
                    }
                    self.trailers.extend_from_slice(&buf[..end + 2]);
                    buf.advance(end + 2);
                    if end == 0 {
                        self.state = State::Done;
                        let section = std::mem::take(&mut self.trailers);
                        return Ok(Step::End(if section.len() > 2 {
                            parse_trailers(&section)?
                        } else {
                            None
                        }));
                    }
                    self.state = State::Trailers(seen);
                }
                State::Done => return Ok(Step::End(None)),
            }
        }
    }
}

/// The line that starts a chunk of `len` bytes.
#[must_use]
pub fn chunk_head(len: usize) -> Bytes {
    Bytes::from(format!("{len:x}\r\n"))
}

/// What ends a chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// The last chunk's line, before a trailer section.
pub const LAST_CHUNK_LINE: &[u8] = b"0\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` to a decoder `step` bytes at a time; returns the body or
    /// the error.
    fn decode_in_pieces(wire: &[u8], step: usize) -> Result<(Vec<u8>, usize), &'static str> {
        decode_with_trailers(wire, step).map(|(body, left, _)| (body, left))
    }

    fn decode_with_trailers(
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, usize, Option<HeaderMap>), &'static str> {
        let mut d = Decoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Step::Data(b) => body.extend_from_slice(&b),
                Step::End(trailers) => return Ok((body, buf.len(), trailers)),
                Step::NeedMore => {
                    if fed == wire.len() {
                        return Err("eof");
                    }
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn decodes_across_every_split() {
        let wire =
            b"5\r\nhello\r\n1A;name=val\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for step in 1..=wire.len() {
            let (body, left) = decode_in_pieces(wire, step).unwrap();
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            // Bytes after the body stay in the buffer (a pipelined response).
            assert!(left <= 4, "step {step}");
        }
    }

    #[test]
    fn passes_trailers_but_not_the_forbidden_ones() {
        let wire = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\ncontent-length: 9\r\nx-sum: a\r\n\r\n";
        for step in 1..=wire.len() {
            let (body, _, trailers) = decode_with_trailers(wire, step).unwrap();
            assert_eq!(body, b"abc");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["x-sum"], "a");
            assert!(
                !trailers.contains_key(header::CONTENT_LENGTH),
                "step {step}"
            );
        }
        let only_forbidden = b"0\r\nhost: evil\r\n\r\n";
        assert_eq!(decode_with_trailers(only_forbidden, 64).unwrap().2, None);
        assert!(decode_with_trailers(b"0\r\nbad field\r\n\r\n", 64).is_err());
        let mut map = HeaderMap::new();
        map.insert("grpc-status", HeaderValue::from_static("0"));
        map.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert_eq!(&encode_trailers(&map)[..], b"grpc-status: 0\r\n\r\n");
    }

    #[test]
    fn rejects_ambiguous_framing() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello!\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b"\r\n",
        ] {
            let err = decode_in_pieces(bad, 64);
            assert!(
                err.is_err() && err != Err("eof"),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn encodes() {
        assert_eq!(&chunk_head(26)[..], b"1a\r\n");
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&chunk_head(3));
        wire.extend_from_slice(b"abc");
        wire.extend_from_slice(CHUNK_END);
        wire.extend_from_slice(LAST_CHUNK);
        assert_eq!(decode_in_pieces(&wire, 1).unwrap().0, b"abc");
    }
}
