//! The HTTP/1.1 chunked transfer coding (RFC 9112 §7.1), decoded
//! incrementally from a read buffer, and its encoding.
//!
//! Strict on purpose: line ends must be CRLF and chunk sizes plain hex, so
//! that nothing a backend sends can be read two ways (response splitting).

use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most trailer bytes accepted (they are read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// What the decoder got out of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes.
    Data(Bytes),
    /// The buffer holds no complete next element: read more.
    NeedMore,
    /// The last chunk and the trailers are consumed.
    End,
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
}

impl Default for Decoder {
    fn default() -> Self {
        Self { state: State::Size }
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
                    buf.advance(end + 2);
                    if end == 0 {
                        self.state = State::Done;
                        return Ok(Step::End);
                    }
                    let seen = seen + end + 2;
                    if seen > MAX_TRAILERS {
                        return Err("the trailers are too large");
                    }
                    self.state = State::Trailers(seen);
                }
                State::Done => return Ok(Step::End),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` to a decoder `step` bytes at a time; returns the body or
    /// the error.
    fn decode_in_pieces(wire: &[u8], step: usize) -> Result<(Vec<u8>, usize), &'static str> {
        let mut d = Decoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Step::Data(b) => body.extend_from_slice(&b),
                Step::End => return Ok((body, buf.len())),
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
