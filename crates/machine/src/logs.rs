//! Reading a machine's log: its segments in order, whole or from the end,
//! and followed as they grow.
//!
//! hangar-init writes the log into two segment files in turns, each
//! numbered by a header, emptying the older one when the newer is full (see
//! its `output` module), so the log is capped and the oldest output goes
//! first. A log from before segments (`output.log`) is read first, as it
//! is. Output older than the oldest segment is gone, and the log says so.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use hangar_api::{LogsQuery, MachineState};
use hangar_init_protocol::log::{HEADER_LEN, parse_header};

use crate::{MachinePaths, Manager, Result};

const CHUNK: usize = 64 * 1024;

/// Orders segments: by number, then by file (the legacy log, A, B), since
/// files without a header all count as number 0.
type Key = (u64, usize);

#[derive(Debug, Clone)]
struct Segment {
    key: Key,
    path: PathBuf,
    /// Where the output starts (after the header).
    start: u64,
    /// Bytes of output.
    len: u64,
}

fn read_segment(path: &Path, slot: usize) -> Option<Segment> {
    let file = File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let (seq, start) = header_of(&file);
    (size > start).then(|| Segment {
        key: (seq, slot),
        path: path.to_owned(),
        start,
        len: size - start,
    })
}

/// A segment's number and header length (0 and 0 for a file without one).
fn header_of(file: &File) -> (u64, u64) {
    let mut head = [0u8; HEADER_LEN];
    let n = file.read_at(&mut head, 0).unwrap_or(0);
    match parse_header(&head[..n]) {
        Some(seq) => (seq, HEADER_LEN as u64),
        None => (0, 0),
    }
}

/// The segments that hold output, oldest first.
fn segments(paths: &MachinePaths) -> Vec<Segment> {
    let files = [&paths.legacy_log, &paths.log_segments[0], &paths.log_segments[1]];
    let mut found: Vec<Segment> = files
        .iter()
        .enumerate()
        .filter_map(|(slot, path)| read_segment(path, slot))
        .collect();
    found.sort_by_key(|s| s.key);
    found
}

/// A reader's place: `offset` bytes into the output of the segment `key`.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    key: Key,
    offset: u64,
}

#[derive(Debug)]
struct LogReader {
    paths: MachinePaths,
    cursor: Option<Cursor>,
    /// Said before the next output.
    notice: Option<&'static str>,
}

const CUT: &str =
    "[hangar: older output was dropped: a machine's log keeps its newest output (hangar serve --machine-log-mb)]\n";
const CUT_WHILE_READING: &str =
    "[hangar: output was dropped while it was being read: the log is written faster than it is read]\n";

impl LogReader {
    /// Starts at the beginning of the log, or `tail` bytes before its end.
    fn open(paths: MachinePaths, tail: Option<u64>) -> LogReader {
        let segs = segments(&paths);
        let first_numbered = segs.iter().filter(|s| s.start > 0).map(|s| s.key.0).min();
        let mut reader = LogReader {
            paths,
            cursor: None,
            notice: None,
        };
        match tail {
            None => {
                reader.cursor = segs.first().map(|s| Cursor { key: s.key, offset: 0 });
                // Segment 1 was the first: anything later means some of
                // the oldest output is gone.
                if first_numbered.is_some_and(|seq| seq > 1) {
                    reader.notice = Some(CUT);
                }
            }
            Some(mut tail) => {
                for s in segs.iter().rev() {
                    reader.cursor = Some(Cursor {
                        key: s.key,
                        offset: s.len.saturating_sub(tail),
                    });
                    tail = tail.saturating_sub(s.len);
                    if tail == 0 {
                        break;
                    }
                }
            }
        }
        reader
    }

    /// The next bytes of the log; `None` at its end (for now).
    fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if let Some(notice) = self.notice.take() {
            return Ok(Some(notice.as_bytes().to_vec()));
        }
        loop {
            let segs = segments(&self.paths);
            let Some(cursor) = self
                .cursor
                .or_else(|| segs.first().map(|s| Cursor { key: s.key, offset: 0 }))
            else {
                return Ok(None);
            };
            self.cursor = Some(cursor);
            let later = segs.iter().find(|s| s.key > cursor.key);
            let Some(seg) = segs.iter().find(|s| s.key == cursor.key) else {
                // Emptied for newer output while we read: go on from the
                // oldest there is.
                self.cursor = later.or(segs.first()).map(|s| Cursor { key: s.key, offset: 0 });
                return Ok(Some(CUT_WHILE_READING.as_bytes().to_vec()));
            };
            if cursor.offset >= seg.len {
                match later {
                    Some(next) => {
                        self.cursor = Some(Cursor {
                            key: next.key,
                            offset: 0,
                        });
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            let file = File::open(&seg.path)?;
            let mut buf = vec![0u8; CHUNK.min((seg.len - cursor.offset) as usize)];
            let n = file.read_at(&mut buf, seg.start + cursor.offset)?;
            // Still the same segment after the read? (It may have been
            // emptied and renumbered under us.)
            if header_of(&file).0 != cursor.key.0 || n == 0 {
                continue;
            }
            buf.truncate(n);
            self.cursor = Some(Cursor {
                key: cursor.key,
                offset: cursor.offset + n as u64,
            });
            return Ok(Some(buf));
        }
    }
}

impl Manager {
    /// The output of a machine's main process (stdout and stderr,
    /// interleaved), oldest first, or the last `tail_bytes`; with
    /// `follow`, new output as it comes, until the machine is destroyed.
    pub async fn logs(
        &self,
        app: &str,
        id: &str,
        query: &LogsQuery,
    ) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        let rec = self.record(app, id).await?;
        let reader = LogReader::open(self.paths(&rec.id), query.tail_bytes);
        let state = (Some(reader), self.clone(), rec.app, rec.id, query.follow);
        Ok(futures_util::stream::unfold(
            state,
            |(reader, mgr, app, id, follow)| async move {
                let mut reader = reader?;
                loop {
                    let (back, chunk) = tokio::task::spawn_blocking(move || {
                        let chunk = reader.next_chunk();
                        (reader, chunk)
                    })
                    .await
                    .ok()?;
                    reader = back;
                    match chunk {
                        Ok(Some(bytes)) => return Some((Ok(Bytes::from(bytes)), (Some(reader), mgr, app, id, follow))),
                        Err(e) => return Some((Err(e), (None, mgr, app, id, follow))),
                        Ok(None) if !follow => return None,
                        Ok(None) => {}
                    }
                    // Polling keeps follow simple: one read per tick per
                    // follower; a destroyed machine ends the stream.
                    match mgr.record(&app, &id).await {
                        Ok(rec) if rec.state != MachineState::Destroyed => {}
                        _ => return None,
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_init_protocol::log::header;

    fn read_all(reader: &mut LogReader) -> String {
        let mut out = Vec::new();
        while let Some(chunk) = reader.next_chunk().unwrap() {
            out.extend(chunk);
        }
        String::from_utf8(out).unwrap()
    }

    fn machine(dir: &Path) -> MachinePaths {
        std::fs::create_dir_all(dir.join("machines/m")).unwrap();
        MachinePaths::new(dir, "m")
    }

    #[test]
    fn reads_segments_in_order_and_says_when_output_was_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = machine(dir.path());
        std::fs::write(&p.legacy_log, "legacy\n").unwrap();
        std::fs::write(&p.log_segments[1], format!("{}one\n", header(1))).unwrap();
        std::fs::write(&p.log_segments[0], format!("{}two\n", header(2))).unwrap();
        assert_eq!(read_all(&mut LogReader::open(p.clone(), None)), "legacy\none\ntwo\n");
        assert_eq!(read_all(&mut LogReader::open(p.clone(), Some(6))), "e\ntwo\n");

        // Segment 1 emptied for segment 3: the oldest output is gone.
        std::fs::remove_file(&p.legacy_log).unwrap();
        let mut follower = LogReader::open(p.clone(), Some(4));
        assert_eq!(read_all(&mut follower), "two\n");
        std::fs::write(&p.log_segments[1], format!("{}three\n", header(3))).unwrap();
        assert_eq!(read_all(&mut follower), "three\n");
        let whole = read_all(&mut LogReader::open(p.clone(), None));
        assert_eq!(whole, format!("{CUT}two\nthree\n"));

        // A follower whose segment is emptied under it says so.
        let mut follower = LogReader::open(p.clone(), None);
        follower.notice = None;
        assert_eq!(follower.next_chunk().unwrap().unwrap(), b"two\n");
        std::fs::write(&p.log_segments[0], format!("{}four\n", header(4))).unwrap();
        assert_eq!(read_all(&mut follower), format!("{CUT_WHILE_READING}three\nfour\n"));
    }
}
