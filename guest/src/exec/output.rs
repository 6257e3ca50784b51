//! A session's output: one sequence of bytes numbered from 0 (stdout and
//! stderr interleaved as they came, or a TTY's), of which the newest are
//! held in memory and, beyond that, up to a larger bound in a ring file on
//! the data disk, so a client that reattaches with the offset it reached
//! gets every byte it missed, in order, without the guest holding them all
//! in memory.
//!
//! Which stream each byte came from is kept as the list of offsets where
//! the stream changes ([`Output::read`] never crosses one).
#![deny(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nestbox_api::exec::StreamId;

/// The most one read returns.
pub const READ_MAX: usize = 64 << 10;

/// Where the bytes from `offset` are.
#[derive(Debug, PartialEq, Eq)]
pub enum Held {
    /// In memory: the stream and the bytes (up to [`READ_MAX`]).
    Memory(StreamId, Vec<u8>),
    /// In the ring file: read `len` bytes at `offset` with [`Spill::read`].
    Disk {
        /// The stream.
        stream: StreamId,
        /// The first byte.
        offset: u64,
        /// How many.
        len: usize,
    },
    /// Lost: the oldest byte still held is this one.
    Gap(u64),
    /// Nothing yet: `offset` is the end.
    End,
}

/// The ring file: byte `n` of the output at `n % cap`.
#[derive(Debug)]
pub struct Spill {
    file: File,
    cap: u64,
}

impl Spill {
    /// A ring of `cap` bytes in `file` (created empty by the caller).
    #[must_use]
    pub fn new(file: File, cap: u64) -> Arc<Self> {
        Arc::new(Self {
            file,
            cap: cap.max(1),
        })
    }

    /// Writes `data`, which starts at output offset `offset` (blocking:
    /// called on the blocking pool).
    ///
    /// # Errors
    /// The write's error.
    #[allow(
        clippy::disallowed_methods,
        reason = "positional file I/O, on the blocking pool"
    )]
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        // Only the newest `cap` bytes fit.
        let skip = data
            .len()
            .saturating_sub(usize::try_from(self.cap).unwrap_or(usize::MAX));
        let (mut offset, mut data) = (offset + skip as u64, &data[skip..]);
        while !data.is_empty() {
            let at = offset % self.cap;
            let room = usize::try_from(self.cap - at).unwrap_or(usize::MAX);
            let n = room.min(data.len());
            self.file.write_all_at(&data[..n], at)?;
            offset += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Reads `len` bytes at output offset `offset` (blocking).
    ///
    /// # Errors
    /// The read's error.
    #[allow(
        clippy::disallowed_methods,
        reason = "positional file I/O, on the blocking pool"
    )]
    pub fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut out = vec![0; len];
        let mut done = 0;
        while done < len {
            let at = (offset + done as u64) % self.cap;
            let room = usize::try_from(self.cap - at).unwrap_or(usize::MAX);
            let n = room.min(len - done);
            self.file.read_exact_at(&mut out[done..done + n], at)?;
            done += n;
        }
        Ok(out)
    }
}

/// The output held.
#[derive(Debug)]
pub struct Output {
    /// The newest bytes; the first is at `mem_start`.
    mem: VecDeque<u8>,
    mem_start: u64,
    mem_cap: usize,
    /// The next byte's offset.
    end: u64,
    /// The ring file, when it holds more than memory.
    spill: Option<Arc<Spill>>,
    /// The offsets where the stream changes, oldest first (the first entry
    /// covers the oldest byte held).
    streams: VecDeque<(u64, StreamId)>,
}

impl Output {
    /// An empty output holding `mem_cap` bytes in memory and, with `spill`,
    /// as many as its ring beyond.
    #[must_use]
    pub fn new(mem_cap: usize, spill: Option<Arc<Spill>>) -> Self {
        Self {
            mem: VecDeque::new(),
            mem_start: 0,
            mem_cap: mem_cap.max(1),
            end: 0,
            spill,
            streams: VecDeque::new(),
        }
    }

    /// The next byte's offset.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The oldest byte held.
    #[must_use]
    pub fn start(&self) -> u64 {
        match &self.spill {
            Some(s) => self.end.saturating_sub(s.cap).min(self.mem_start),
            None => self.mem_start,
        }
    }

    /// The ring file, for writing a chunk there before [`Self::push`].
    #[must_use]
    pub fn spill(&self) -> Option<Arc<Spill>> {
        self.spill.clone()
    }

    /// Appends `data` from `stream` (already written to the ring file, when
    /// there is one, at [`Self::end`]).
    pub fn push(&mut self, stream: StreamId, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.streams.back().is_none_or(|(_, s)| *s != stream) {
            self.streams.push_back((self.end, stream));
        }
        self.mem.extend(data);
        self.end += data.len() as u64;
        let over = self.mem.len().saturating_sub(self.mem_cap);
        self.mem.drain(..over);
        self.mem_start += over as u64;
        // Stream changes older than the oldest byte held go, but the one
        // that covers it stays.
        let start = self.start();
        while self.streams.len() > 1 && self.streams[1].0 <= start {
            self.streams.pop_front();
        }
    }

    /// The stream of byte `offset` and where its run ends.
    fn run(&self, offset: u64) -> (StreamId, u64) {
        let i = self.streams.partition_point(|(at, _)| *at <= offset);
        let stream = self.streams[i.saturating_sub(1)].1;
        let until = self.streams.get(i).map_or(self.end, |(at, _)| *at);
        (stream, until)
    }

    /// Where the bytes from `offset` are (at most [`READ_MAX`], never
    /// crossing a change of stream).
    #[must_use]
    pub fn read(&self, offset: u64) -> Held {
        if offset >= self.end {
            return Held::End;
        }
        if offset < self.start() {
            return Held::Gap(self.start());
        }
        let (stream, until) = self.run(offset);
        if offset >= self.mem_start {
            let from = usize::try_from(offset - self.mem_start).expect("within memory");
            let len = usize::try_from(until - offset)
                .unwrap_or(usize::MAX)
                .min(READ_MAX);
            let (a, b) = self.mem.as_slices();
            let mut data = Vec::with_capacity(len);
            if from < a.len() {
                data.extend_from_slice(&a[from..a.len().min(from + len)]);
            }
            let rest = len - data.len();
            let from_b = from.saturating_sub(a.len());
            data.extend_from_slice(&b[from_b..from_b + rest]);
            return Held::Memory(stream, data);
        }
        let len = usize::try_from(until.min(self.mem_start) - offset)
            .unwrap_or(usize::MAX)
            .min(READ_MAX);
        Held::Disk {
            stream,
            offset,
            len,
        }
    }

    /// Whether bytes read from the ring file at `offset` were still there
    /// after the read (a writer may have gone round since).
    #[must_use]
    pub fn still_held(&self, offset: u64) -> bool {
        offset >= self.start()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "a test's files")]
mod tests {
    use super::*;

    fn drain(out: &Output, mut offset: u64) -> (Vec<(StreamId, Vec<u8>)>, Option<u64>) {
        let mut got = Vec::new();
        let mut gap = None;
        loop {
            match out.read(offset) {
                Held::Memory(s, data) => {
                    offset += data.len() as u64;
                    got.push((s, data));
                }
                Held::Disk {
                    stream,
                    offset: at,
                    len,
                } => {
                    let data = out.spill.as_ref().unwrap().read(at, len).unwrap();
                    assert!(out.still_held(at));
                    offset += len as u64;
                    got.push((stream, data));
                }
                Held::Gap(to) => {
                    gap = Some(to);
                    offset = to;
                }
                Held::End => return (got, gap),
            }
        }
    }

    fn joined(chunks: &[(StreamId, Vec<u8>)]) -> Vec<u8> {
        chunks.iter().flat_map(|(_, d)| d.clone()).collect()
    }

    #[test]
    fn memory_only_keeps_the_newest_and_reports_the_gap() {
        let mut out = Output::new(10, None);
        out.push(StreamId::Stdout, b"0123456789");
        out.push(StreamId::Stderr, b"abcde");
        assert_eq!(out.end(), 15);
        assert_eq!(out.start(), 5);
        let (chunks, gap) = drain(&out, 0);
        assert_eq!(gap, Some(5));
        assert_eq!(
            chunks,
            [
                (StreamId::Stdout, b"56789".to_vec()),
                (StreamId::Stderr, b"abcde".to_vec())
            ]
        );
        assert_eq!(out.read(15), Held::End);
    }

    #[test]
    fn the_ring_file_holds_what_memory_no_longer_does_in_order_and_by_stream() {
        let dir = std::env::temp_dir().join(format!("nb-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ring");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let spill = Spill::new(file, 1000);
        let mut out = Output::new(64, Some(spill.clone()));
        let mut all = Vec::new();
        for i in 0..300u32 {
            let stream = if i % 7 == 0 {
                StreamId::Stderr
            } else {
                StreamId::Stdout
            };
            let data = format!("<{i}>").into_bytes();
            spill.write(out.end(), &data).unwrap();
            out.push(stream, &data);
            all.extend_from_slice(&data);
        }
        // The newest 1000 bytes are held; older ones are a gap.
        let (chunks, gap) = drain(&out, 0);
        let start = out.start();
        assert_eq!(start, all.len() as u64 - 1000);
        assert_eq!(gap, Some(start));
        assert_eq!(joined(&chunks), all[usize::try_from(start).unwrap()..]);
        // From an offset still held: no gap, exactly the rest.
        let from = start + 123;
        let (chunks, gap) = drain(&out, from);
        assert_eq!(gap, None);
        assert_eq!(joined(&chunks), all[usize::try_from(from).unwrap()..]);
        // Every chunk is one stream's: stderr chunks are `<7k>` pieces.
        for (stream, data) in &chunks {
            let text = String::from_utf8_lossy(data);
            if *stream == StreamId::Stderr {
                assert!(!text.contains('<') || text.starts_with('<'), "{text}");
            }
        }
        // A write larger than the ring keeps its newest bytes.
        let big: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        spill.write(out.end(), &big).unwrap();
        out.push(StreamId::Stdout, &big);
        let (chunks, _) = drain(&out, out.start());
        assert_eq!(joined(&chunks), big[1500..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
