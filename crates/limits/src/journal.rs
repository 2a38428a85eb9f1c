//! The memory store's write-ahead journal: every change to counters and settings, appended
//! to one file (before the send it admits is forwarded), and read back in order at start-up.
//!
//! A record is framed as `len: u32 LE | crc32: u32 LE | payload`, the checksum over the
//! payload. A record cut short by a crash (the last one, torn mid-write) is dropped and the
//! file truncated before it; a bad record with more after it is corruption, and opening
//! fails rather than silently forgetting what followed. The file opens with [`MAGIC`], so a
//! file that is not a journal is refused too.
//!
//! The store decides how records are batched into writes and when they are synced (see
//! `memory::persist`). When the file passes a size, the store rewrites it as a snapshot of
//! what is live: written to a temporary file, synced, then renamed over the journal.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The first bytes of every journal file (the last one is the format's version).
pub(crate) const MAGIC: &[u8; 8] = b"SGWJRNL1";

const FRAME: usize = 8;
/// Longest record accepted when reading (a record holds one scope's change; far below this).
const MAX_RECORD: usize = 16 << 20;

/// One change. Strings borrow from the store (when writing) or the file (when reading).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    /// A charge landed in a scope's windows at `now` (the store's clock).
    Charge {
        scope: &'a str,
        now: u64,
        counts: [u64; 3],
        landed: Vec<Landed<'a>>,
    },
    /// An admitted request remembered under its idempotency key until `until`.
    Idempotent {
        scope: &'a str,
        key: &'a str,
        until: u64,
        reservation: &'a str,
    },
    /// A reservation given back at `now` ([`crate::Reservation::to_record`]).
    Release {
        scope: &'a str,
        now: u64,
        reservation: &'a str,
    },
    /// A scope reset at `now`.
    Reset { scope: &'a str, now: u64 },
    /// A setting written, forever (`until` `None`) or until an instant.
    MetaSet {
        scope: &'a str,
        name: &'a str,
        value: &'a str,
        until: Option<u64>,
    },
    /// A setting removed.
    MetaDelete { scope: &'a str, name: &'a str },
    /// Snapshot only: a scope's bookkeeping.
    Scope {
        scope: &'a str,
        expires_at: u64,
        reset_at: Option<u64>,
        latest: u64,
    },
    /// Snapshot only: a reservation already given back, remembered until `until`.
    Released { scope: &'a str, id: u64, until: u64 },
}

/// Where one window of a charge landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Landed<'a> {
    pub window_id: &'a str,
    /// A calendar window (the slot is the period's start) rather than a rolling one.
    pub calendar: bool,
    pub slot: u64,
    /// When the bucket or period stops counting.
    pub expires_at: u64,
}

const NONE: u64 = u64::MAX;

impl Record<'_> {
    /// Appends the framed record to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME]);
        self.payload(&mut Enc(out));
        let len = u32::try_from(out.len() - start - FRAME).unwrap_or(u32::MAX);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        let crc = frame_crc(&out[start..start + 4], &out[start + FRAME..]);
        out[start + 4..start + FRAME].copy_from_slice(&crc.to_le_bytes());
    }

    fn payload(&self, e: &mut Enc<'_>) {
        match self {
            Record::Charge {
                scope,
                now,
                counts,
                landed,
            } => {
                e.tag(1).str(scope).u64(*now);
                counts.iter().for_each(|c| {
                    e.u64(*c);
                });
                e.u64(landed.len() as u64);
                for l in landed {
                    e.str(l.window_id).tag(u8::from(l.calendar));
                    e.u64(l.slot).u64(l.expires_at);
                }
            }
            Record::Idempotent {
                scope,
                key,
                until,
                reservation,
            } => {
                e.tag(2).str(scope).str(key).u64(*until).str(reservation);
            }
            Record::Release {
                scope,
                now,
                reservation,
            } => {
                e.tag(3).str(scope).u64(*now).str(reservation);
            }
            Record::Reset { scope, now } => {
                e.tag(4).str(scope).u64(*now);
            }
            Record::MetaSet {
                scope,
                name,
                value,
                until,
            } => {
                e.tag(5).str(scope).str(name).str(value);
                e.u64(until.unwrap_or(NONE));
            }
            Record::MetaDelete { scope, name } => {
                e.tag(6).str(scope).str(name);
            }
            Record::Scope {
                scope,
                expires_at,
                reset_at,
                latest,
            } => {
                e.tag(7).str(scope).u64(*expires_at);
                e.u64(reset_at.unwrap_or(NONE)).u64(*latest);
            }
            Record::Released { scope, id, until } => {
                e.tag(8).str(scope).u64(*id).u64(*until);
            }
        }
    }
}

impl<'a> Record<'a> {
    /// Reads one payload; `None` when it is not a record this version writes.
    fn decode(payload: &'a [u8]) -> Option<Record<'a>> {
        let mut d = Dec(payload);
        let rec = match d.tag()? {
            1 => {
                let (scope, now) = (d.str()?, d.u64()?);
                let counts = [d.u64()?, d.u64()?, d.u64()?];
                let n = usize::try_from(d.u64()?).ok()?;
                let mut landed = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    let (window_id, calendar) = (d.str()?, d.tag()? == 1);
                    let (slot, expires_at) = (d.u64()?, d.u64()?);
                    landed.push(Landed {
                        window_id,
                        calendar,
                        slot,
                        expires_at,
                    });
                }
                Record::Charge {
                    scope,
                    now,
                    counts,
                    landed,
                }
            }
            2 => Record::Idempotent {
                scope: d.str()?,
                key: d.str()?,
                until: d.u64()?,
                reservation: d.str()?,
            },
            3 => Record::Release {
                scope: d.str()?,
                now: d.u64()?,
                reservation: d.str()?,
            },
            4 => Record::Reset {
                scope: d.str()?,
                now: d.u64()?,
            },
            5 => Record::MetaSet {
                scope: d.str()?,
                name: d.str()?,
                value: d.str()?,
                until: d.opt()?,
            },
            6 => Record::MetaDelete {
                scope: d.str()?,
                name: d.str()?,
            },
            7 => Record::Scope {
                scope: d.str()?,
                expires_at: d.u64()?,
                reset_at: d.opt()?,
                latest: d.u64()?,
            },
            8 => Record::Released {
                scope: d.str()?,
                id: d.u64()?,
                until: d.u64()?,
            },
            _ => return None,
        };
        d.0.is_empty().then_some(rec)
    }
}

struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn tag(&mut self, t: u8) -> &mut Self {
        self.0.push(t);
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0
            .extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn tag(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn opt(&mut self) -> Option<Option<u64>> {
        self.u64().map(|v| (v != NONE).then_some(v))
    }
    fn str(&mut self) -> Option<&'a str> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
        std::str::from_utf8(self.take(usize::try_from(len).ok()?)?).ok()
    }
}

/// Every record of a journal's bytes, in order, and how many bytes they fill (less than
/// the input when its last record was torn).
///
/// # Errors
/// The bytes do not start with [`MAGIC`], or a record is damaged with more after it.
pub(crate) fn records(bytes: &[u8]) -> io::Result<(Vec<Record<'_>>, usize)> {
    let body = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| corrupt(0, "the file is not a send-gateway journal"))?;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let Some((rec, next)) = frame_at(body, pos)? else {
            break;
        };
        out.push(rec);
        pos = next;
    }
    Ok((out, MAGIC.len() + pos))
}

/// The record at `pos` and where the next starts; `None` for a torn last record.
///
/// A bad or short record is a torn tail only when nothing valid follows it: a crash cuts
/// the last write short, or leaves zeros where it never landed, but never writes a whole
/// record after a damaged one. A damaged length is caught the same way.
fn frame_at(body: &[u8], pos: usize) -> io::Result<Option<(Record<'_>, usize)>> {
    let rest = &body[pos..];
    match frame(rest) {
        Frame::Record(rec, used) => Ok(Some((rec, pos + used))),
        _ if is_torn_tail(rest) => Ok(None),
        Frame::Short => Err(corrupt(
            MAGIC.len() + pos,
            "a record runs past the records after it",
        )),
        Frame::Bad => Err(corrupt(MAGIC.len() + pos, "a record fails its checksum")),
    }
}

/// What the bytes at the start of `rest` hold.
enum Frame<'a> {
    /// A whole, valid record, and its length with the frame.
    Record(Record<'a>, usize),
    /// The start of a record whose end is missing.
    Short,
    /// A damaged record: an empty or impossible length, or a failed checksum.
    Bad,
}

fn frame(rest: &[u8]) -> Frame<'_> {
    let Some(head) = rest.get(..FRAME) else {
        return Frame::Short;
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 || len > MAX_RECORD {
        return Frame::Bad;
    }
    let Some(payload) = rest.get(FRAME..FRAME + len) else {
        return Frame::Short;
    };
    match (frame_crc(&head[..4], payload) == crc)
        .then(|| Record::decode(payload))
        .flatten()
    {
        Some(rec) => Frame::Record(rec, FRAME + len),
        None => Frame::Bad,
    }
}

/// The checksum of a frame: its length field and its payload, so a damaged length fails.
fn frame_crc(len: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// Whether `rest` (starting with a bad or short record) is what a crash leaves: zeros, or
/// bytes in which no whole valid record starts.
fn is_torn_tail(rest: &[u8]) -> bool {
    rest.iter().all(|&b| b == 0)
        || !(1..rest.len()).any(|i| matches!(frame(&rest[i..]), Frame::Record(..)))
}

fn corrupt(offset: usize, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{what} at byte {offset}; the journal is damaged: move it aside to start empty, \
             or restore it from a backup"
        ),
    )
}

/// The journal file of one store directory, open for appending.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    file: File,
    len: u64,
    sync_each_write: bool,
    /// Why the journal takes no more writes: a failed write could not be cut back, or a
    /// sync failed (the kernel may have dropped the pages, so nothing written is sure).
    broken: Option<String>,
    /// Held for the store's life: a second process on the same directory is refused.
    lock: File,
}

impl Journal {
    /// Opens (creating) the journal in `dir`, repairs a torn tail, and returns it with the
    /// file's whole contents, to be read with [`records`].
    ///
    /// # Errors
    /// The directory cannot be used, another process holds it, or the journal is damaged.
    pub(crate) fn open(dir: &Path, sync_each_write: bool) -> io::Result<(Journal, Vec<u8>)> {
        std::fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        let path = dir.join("journal");
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        if bytes.is_empty() {
            file.write_all(MAGIC)?;
            file.sync_all()?;
            bytes.extend_from_slice(MAGIC);
        }
        let (_, good) = records(&bytes)?;
        if good < bytes.len() {
            file.set_len(good as u64)?;
            bytes.truncate(good);
        }
        let journal = Journal {
            dir: dir.to_owned(),
            len: good as u64,
            file,
            sync_each_write,
            broken: None,
            lock,
        };
        Ok((journal, bytes))
    }

    /// Writes `bytes` (encoded records) in one write, and syncs when every write is synced.
    /// A failed write is cut back off the file, so that the caller may write the same bytes
    /// again; when that fails too, or a sync fails, every later write fails.
    ///
    /// # Errors
    /// The write failed (the disk is full, say), or the journal is broken.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Some(why) = &self.broken {
            return Err(io::Error::other(why.clone()));
        }
        if let Err(e) = self.file.write_all(bytes) {
            if let Err(cut) = self.file.set_len(self.len) {
                self.broken = Some(format!(
                    "a failed write ({e}) could not be cut back ({cut}); \
                     the journal takes no more writes"
                ));
            }
            return Err(e);
        }
        self.len += bytes.len() as u64;
        if self.sync_each_write
            && let Err(e) = self.file.sync_data()
        {
            self.broken = Some(format!(
                "a sync failed ({e}); the journal takes no more writes"
            ));
            return Err(e);
        }
        Ok(())
    }

    /// Why the journal takes no more writes, once it does not.
    pub(crate) fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Lets another process open the directory (this one writes no more).
    pub(crate) fn unlock(&mut self) {
        let _ = self.lock.unlock();
    }

    /// A second handle on the journal file, to sync it without holding the journal.
    ///
    /// # Errors
    /// The file could not be duplicated.
    pub(crate) fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// The journal's size in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Flushes what was written to the disk.
    ///
    /// # Errors
    /// The sync failed.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Replaces the journal with `snapshot` (the records of everything live), atomically:
    /// a crash leaves either the old journal or the new one. `Ok(Some(_))` says the new
    /// journal is in use but the directory could not be synced, so a crash may still
    /// bring back the old one (which holds the same state, only longer).
    ///
    /// # Errors
    /// The new file could not be written; the old journal is kept and stays in use.
    pub(crate) fn rewrite(&mut self, snapshot: &[u8]) -> io::Result<Option<io::Error>> {
        let tmp = self.dir.join("journal.tmp");
        let written = (|| {
            let mut out = File::create(&tmp)?;
            out.write_all(MAGIC)?;
            out.write_all(snapshot)?;
            out.sync_all()?;
            // Opened before the rename, so that nothing can fail between it and the switch.
            let file = OpenOptions::new().append(true).open(&tmp)?;
            std::fs::rename(&tmp, self.dir.join("journal"))?;
            Ok(file)
        })();
        let file = match written {
            Ok(file) => file,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.file = file;
        self.len = (MAGIC.len() + snapshot.len()) as u64;
        Ok(File::open(&self.dir).and_then(|d| d.sync_all()).err())
    }
}

/// Takes the directory's `LOCK` file, or says who holds it.
fn lock_dir(dir: &Path) -> io::Result<File> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{} is in use by another send-gateway process; give each instance its own \
                 [store] path",
                dir.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record<'static>> {
        vec![
            Record::Charge {
                scope: "grant:a",
                now: 5,
                counts: [1, 2, 3],
                landed: vec![Landed {
                    window_id: "24h",
                    calendar: false,
                    slot: 9,
                    expires_at: 99,
                }],
            },
            Record::MetaSet {
                scope: "grant:a",
                name: "profile",
                value: "line\nbreak",
                until: None,
            },
            Record::Reset {
                scope: "grant:b",
                now: 7,
            },
        ]
    }

    fn file_of(recs: &[Record<'_>]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        recs.iter().for_each(|r| r.encode(&mut bytes));
        bytes
    }

    #[test]
    fn records_read_back_as_written() {
        let bytes = file_of(&sample());
        let (read, good) = records(&bytes).unwrap();
        assert_eq!(read, sample());
        assert_eq!(good, bytes.len());
    }

    #[test]
    fn a_torn_last_record_is_dropped_at_every_cut() {
        let whole = file_of(&sample());
        let two = file_of(&sample()[..2]).len();
        for cut in two + 1..whole.len() {
            let (read, good) = records(&whole[..cut]).unwrap();
            assert_eq!(read, sample()[..2], "cut at {cut}");
            assert_eq!(good, two);
        }
    }

    #[test]
    fn damage_before_the_end_is_refused() {
        let mut bytes = file_of(&sample());
        bytes[MAGIC.len() + FRAME + 3] ^= 0xff;
        let err = records(&bytes).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(records(b"not a journal at all").is_err());
    }

    #[test]
    fn zeros_where_the_last_write_never_landed_are_a_torn_tail() {
        let two = file_of(&sample()[..2]);
        for zeros in [1, FRAME, FRAME + 1, 4096] {
            let mut bytes = two.clone();
            bytes.resize(two.len() + zeros, 0);
            let (read, good) = records(&bytes).unwrap();
            assert_eq!(read, sample()[..2], "{zeros} zeros");
            assert_eq!(good, two.len());
        }
    }

    #[test]
    fn a_damaged_length_is_refused_not_read_as_a_torn_tail() {
        // The first record's length made longer, still within the file: the records after
        // it would be lost as a "torn tail" if the length were trusted.
        let mut bytes = file_of(&sample());
        let at = MAGIC.len();
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        for damaged in [len + 1, len + 40, (bytes.len() - at) as u32 + 10] {
            bytes[at..at + 4].copy_from_slice(&damaged.to_le_bytes());
            assert!(records(&bytes).is_err(), "length {damaged} of {len}");
        }
        // A zero length is never a record either.
        bytes[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(records(&bytes).is_err());
    }

    #[test]
    fn a_second_process_cannot_open_the_same_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (_held, _) = Journal::open(dir.path(), false).unwrap();
        let err = Journal::open(dir.path(), false).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
