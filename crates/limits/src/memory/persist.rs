//! Keeping the memory store across restarts: every change is recorded in a journal
//! ([`crate::journal`]), replayed at start-up, and compacted into a snapshot of what is live
//! when the journal grows.
//!
//! A decision is not held up by a write to the disk: its records go to an in-process
//! buffer, and the buffer is written out in one write by whichever comes first: the
//! caller's [`crate::QuotaStore::durable`] (the gateway calls it before it forwards an admitted
//! send, so no send goes out whose charge a `kill -9` could lose), a change that is written
//! at once (settings, resets and forced charges: rare, and answered only once written), or
//! the background writer, every [`WRITE_EVERY`]. Under load one write carries the records
//! of many sends.
//!
//! Changes of one scope reach the journal in the order they were made: each is buffered
//! while its scope (or setting) is still locked, and buffers are written in the order they
//! were taken. Compaction waits for every change in flight (the `gate`), so a snapshot
//! never holds a change that is also buffered after it.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, Weak};
use std::time::Duration;

use crate::decision::{Allowance, Decision, Reservation, Usage};
use crate::journal::{Journal, Landed, Record, records};
use crate::store::StoreError;
use crate::window::add;

use super::{MemoryStore, ScopeState, WindowState};

/// When the journal reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every change, before it is answered: a power cut loses nothing, at the cost of
    /// one disk flush per send.
    Always,
    /// In the background at this interval: a crash of the process loses nothing (the
    /// operating system holds what was written); a power cut or kernel crash loses at most
    /// the changes of the last interval.
    Every(Duration),
}

/// The longest a buffered record waits for the background writer.
pub const WRITE_EVERY: Duration = Duration::from_millis(5);

/// How a [`MemoryStore`] keeps its state and how much it holds.
#[derive(Debug, Clone)]
pub struct MemoryOptions {
    /// The directory of its journal; `None` keeps everything in memory only (a restart
    /// forgets it).
    pub path: Option<PathBuf>,
    /// Most scopes held at once; past it a new scope is refused with [`StoreError::Full`].
    /// `None`: no cap.
    pub max_scopes: Option<usize>,
    /// When the journal is flushed to the disk.
    pub fsync: Fsync,
    /// The journal is rewritten as a snapshot once it passes this size (or twice the last
    /// snapshot's, if larger).
    pub compact_at_bytes: u64,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            path: None,
            max_scopes: None,
            fsync: Fsync::Every(Duration::from_secs(1)),
            compact_at_bytes: 64 << 20,
        }
    }
}

/// The journal of a persistent store.
#[derive(Debug)]
pub(super) struct Persist {
    /// Records not yet written, in order.
    pending: Mutex<Vec<u8>>,
    /// Taken before `pending` by whoever writes.
    journal: Mutex<Journal>,
    /// Held shared by every change in flight, exclusively by compaction.
    gate: RwLock<()>,
    compact_due: AtomicBool,
    compact_at: AtomicU64,
    base: u64,
    /// A second handle on the journal file, synced by the background flusher.
    sync_handle: Mutex<Arc<File>>,
}

impl Persist {
    fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pending(&self) -> MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes out everything buffered so far. On failure the bytes stay buffered, ahead of
    /// anything buffered since, to be written by the next attempt.
    fn write_pending(&self) -> Result<(), StoreError> {
        let mut journal = self.journal();
        let bytes = std::mem::take(&mut *self.pending());
        if bytes.is_empty() {
            return Ok(());
        }
        if let Err(e) = journal.write(&bytes) {
            let mut pending = self.pending();
            let later = std::mem::replace(&mut *pending, bytes);
            pending.extend_from_slice(&later);
            return Err(journal_failed(&e));
        }
        if journal.len() > self.compact_at.load(Ordering::Relaxed) {
            self.compact_due.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Persist {
    /// Writes and syncs what is buffered, and frees the directory for the next process
    /// at once (the background writer may still hold this for a moment).
    pub(super) fn close(&self) {
        let _ = self.write_pending();
        let mut journal = self.journal();
        let _ = journal.sync();
        journal.unlock();
    }
}

fn journal_failed(e: &std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("the quota journal could not be written: {e}"))
}

impl MemoryStore {
    /// Opens the journal at `options.path`, replays it into `self`, and starts flushing.
    pub(super) fn attach(&mut self, options: &MemoryOptions) -> std::io::Result<()> {
        let Some(dir) = &options.path else {
            return Ok(());
        };
        let (journal, bytes) = Journal::open(dir, options.fsync == Fsync::Always)?;
        let (recs, _) = records(&bytes)?;
        for rec in recs {
            self.apply(rec);
        }
        self.sweep();
        self.restore_fleet();
        let persist = Arc::new(Persist {
            pending: Mutex::new(Vec::with_capacity(64 << 10)),
            sync_handle: Mutex::new(Arc::new(journal.sync_handle()?)),
            journal: Mutex::new(journal),
            gate: RwLock::new(()),
            compact_due: AtomicBool::new(false),
            compact_at: AtomicU64::new(options.compact_at_bytes),
            base: options.compact_at_bytes,
        });
        let sync_every = match options.fsync {
            Fsync::Every(every) => Some(every),
            Fsync::Always => None,
        };
        spawn_writer(Arc::downgrade(&persist), sync_every)?;
        self.persist = Some(persist);
        self.compact()
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Whether this store keeps its state in a journal.
    pub fn is_persistent(&self) -> bool {
        self.persist.is_some()
    }

    /// Taken by every change before it locks its scope; `None` for a store in memory only.
    /// Runs a compaction first when one is due. A compaction that fails is logged and tried
    /// again once the journal has doubled; changes go on being appended meanwhile.
    pub(super) fn gate(&self) -> Result<Option<RwLockReadGuard<'_, ()>>, StoreError> {
        let Some(p) = &self.persist else {
            return Ok(None);
        };
        if p.compact_due.load(Ordering::Relaxed)
            && let Err(e) = self.compact()
        {
            tracing::warn!(
                error = %e,
                "the quota journal could not be compacted; it is tried again when it doubles"
            );
            let len = p.journal().len();
            p.compact_at.store(p.base.max(2 * len), Ordering::Relaxed);
            p.compact_due.store(false, Ordering::Relaxed);
        }
        Ok(Some(p.gate.read().unwrap_or_else(PoisonError::into_inner)))
    }

    /// Adds `recs` to the journal: buffered, or written before this returns when `now`.
    /// Nothing for a store in memory only.
    pub(super) fn log(&self, recs: &[Record<'_>], now: Write) -> Result<(), StoreError> {
        let Some(p) = &self.persist else {
            return Ok(());
        };
        {
            let mut pending = p.pending();
            recs.iter().for_each(|r| r.encode(&mut pending));
        }
        match now {
            Write::Now => p.write_pending(),
            Write::Buffered => Ok(()),
        }
    }

    /// An outage while the journal takes no more writes (see [`Journal::write`]), so that
    /// readiness reports what every send that must be written first is answered.
    pub(super) fn journal_health(&self) -> Result<(), StoreError> {
        match &self.persist {
            Some(p) => match p.journal().broken() {
                Some(why) => Err(StoreError::Unavailable(format!("the quota journal: {why}"))),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Writes out every buffered record (see [`crate::QuotaStore::durable`]).
    pub(super) fn write_buffered(&self) -> Result<(), StoreError> {
        match &self.persist {
            Some(p) => p.write_pending(),
            None => Ok(()),
        }
    }

    /// Rewrites the journal as a snapshot of what is live, with every change held off.
    fn compact(&self) -> Result<(), StoreError> {
        let Some(p) = &self.persist else {
            return Ok(());
        };
        let _all = p.gate.write().unwrap_or_else(PoisonError::into_inner);
        if p.journal().len() <= p.compact_at.load(Ordering::Relaxed) {
            p.compact_due.store(false, Ordering::Relaxed);
            return Ok(());
        }
        self.sweep();
        let snapshot = self.snapshot();
        let mut journal = p.journal();
        // What is buffered is in the snapshot already: every change in it was made.
        let buffered = std::mem::take(&mut *p.pending());
        match journal.rewrite(&snapshot) {
            Err(e) => {
                let mut pending = p.pending();
                let later = std::mem::replace(&mut *pending, buffered);
                pending.extend_from_slice(&later);
                return Err(journal_failed(&e));
            }
            // In use already, so what was buffered must not be written again.
            Ok(Some(e)) => tracing::warn!(
                error = %e,
                "the compacted quota journal is in use, but its directory could not be synced"
            ),
            Ok(None) => {}
        }
        let handle = journal.sync_handle().map_err(|e| journal_failed(&e))?;
        *p.sync_handle.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(handle);
        p.compact_at
            .store(p.base.max(2 * journal.len()), Ordering::Relaxed);
        p.compact_due.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// The records that rebuild everything live.
    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for entry in &self.scopes {
            entry.value().snapshot(entry.key(), &mut out);
        }
        for entry in &self.meta {
            let ((scope, name), (value, until)) = (entry.key(), entry.value());
            let rec = Record::MetaSet {
                scope,
                name,
                value,
                until: *until,
            };
            rec.encode(&mut out);
        }
        out
    }

    /// Applies one record read back from the journal.
    fn apply(&mut self, rec: Record<'_>) {
        match rec {
            Record::MetaSet {
                scope,
                name,
                value,
                until,
            } => {
                let key = (scope.to_owned(), name.to_owned());
                self.meta.insert(key, (value.to_owned(), until));
            }
            Record::MetaDelete { scope, name } => {
                self.meta.remove(&(scope.to_owned(), name.to_owned()));
            }
            rec => {
                let scope = rec.scope();
                let mut entry = self.scopes.entry(Arc::from(scope)).or_default();
                entry.value_mut().apply(rec);
            }
        }
    }

    /// The records of an admitted decision: its charge, and its idempotency record.
    pub(super) fn log_decision(
        &self,
        state: &ScopeState,
        now: u64,
        decision: &Decision,
        key_until: Option<u64>,
        write: Write,
    ) -> Result<(), StoreError> {
        let (Some(_), Decision::Allowed(a)) = (&self.persist, decision) else {
            return Ok(());
        };
        let r = &a.reservation;
        let landed = r
            .charges
            .iter()
            .map(|c| Landed {
                window_id: &c.window_id,
                calendar: state.is_calendar(&c.window_id),
                slot: c.slot,
                expires_at: c.expires_at_ms,
            })
            .collect();
        let charge = Record::Charge {
            scope: r.scope(),
            now,
            counts: r.cost.to_array(),
            landed,
        };
        let text;
        match (r.idempotency_key(), key_until) {
            (Some(key), Some(until)) => {
                text = r.to_record();
                let idem = Record::Idempotent {
                    scope: r.scope(),
                    key,
                    until,
                    reservation: &text,
                };
                self.log(&[charge, idem], write)
            }
            _ => self.log(&[charge], write),
        }
    }
}

impl Record<'_> {
    /// The scope a counter record belongs to.
    fn scope(&self) -> &str {
        match self {
            Record::Charge { scope, .. }
            | Record::Idempotent { scope, .. }
            | Record::Release { scope, .. }
            | Record::Reset { scope, .. }
            | Record::MetaSet { scope, .. }
            | Record::MetaDelete { scope, .. }
            | Record::Scope { scope, .. }
            | Record::Released { scope, .. } => scope,
        }
    }
}

impl ScopeState {
    fn is_calendar(&self, window_id: &str) -> bool {
        self.windows
            .iter()
            .any(|(id, w)| **id == *window_id && matches!(w, WindowState::Calendar { .. }))
    }

    /// Applies one of this scope's records.
    fn apply(&mut self, rec: Record<'_>) {
        match rec {
            Record::Charge {
                now,
                counts,
                landed,
                ..
            } => {
                for l in &landed {
                    self.land(l, counts);
                    self.expires_at = self.expires_at.max(l.expires_at);
                }
                self.latest = self.latest.max(now);
            }
            Record::Idempotent {
                scope,
                key,
                until,
                reservation,
            } => {
                if let Some(r) = Reservation::from_record(scope, reservation) {
                    let allowance = Allowance {
                        reservation: r,
                        // Reported afresh on a repeat (see `MemoryStore::decide`).
                        usage: Usage::default(),
                        replay: false,
                    };
                    let entry = (Decision::Allowed(allowance), until);
                    self.idempotent.insert(key.to_owned(), entry);
                    self.expires_at = self.expires_at.max(until);
                }
            }
            Record::Release {
                scope,
                now,
                reservation,
            } => {
                if let Some(r) = Reservation::from_record(scope, reservation) {
                    self.release(&r, now);
                }
            }
            Record::Reset { now, .. } => self.reset(now),
            Record::Scope {
                expires_at,
                reset_at,
                latest,
                ..
            } => {
                self.expires_at = self.expires_at.max(expires_at);
                self.reset_at = reset_at.or(self.reset_at);
                self.latest = self.latest.max(latest);
            }
            Record::Released { id, until, .. } => {
                self.released.insert(id, until);
                self.expires_at = self.expires_at.max(until);
            }
            Record::MetaSet { .. } | Record::MetaDelete { .. } => {}
        }
    }

    /// Adds `counts` to the bucket or period a charge landed in.
    fn land(&mut self, l: &Landed<'_>, counts: [u64; 3]) {
        let pos = match self.windows.iter().position(|(id, _)| **id == *l.window_id) {
            Some(pos) => pos,
            None => {
                let state = if l.calendar {
                    WindowState::Calendar {
                        periods: Vec::new(),
                    }
                } else {
                    WindowState::Rolling {
                        buckets: Default::default(),
                        totals: [0; 3],
                    }
                };
                self.windows.push((Arc::from(l.window_id), state));
                self.windows.len() - 1
            }
        };
        self.windows[pos].1.land(l.slot, l.expires_at, counts);
    }

    /// Appends the records that rebuild this scope.
    fn snapshot(&self, scope: &str, out: &mut Vec<u8>) {
        let head = Record::Scope {
            scope,
            expires_at: self.expires_at,
            reset_at: self.reset_at,
            latest: self.latest,
        };
        head.encode(out);
        for (id, w) in &self.windows {
            w.snapshot(scope, id, self.latest, out);
        }
        for (key, (decision, until)) in &self.idempotent {
            if let Some(r) = decision.reservation() {
                let text = r.to_record();
                let rec = Record::Idempotent {
                    scope,
                    key,
                    until: *until,
                    reservation: &text,
                };
                rec.encode(out);
            }
        }
        for (id, until) in &self.released {
            let rec = Record::Released {
                scope,
                id: *id,
                until: *until,
            };
            rec.encode(out);
        }
    }
}

impl WindowState {
    fn land(&mut self, slot: u64, end: u64, counts: [u64; 3]) {
        match self {
            WindowState::Rolling { buckets, totals } => {
                match buckets.binary_search_by_key(&slot, |b| b.0) {
                    Ok(pos) => add(&mut buckets[pos].1, counts),
                    Err(pos) => buckets.insert(pos, (slot, counts)),
                }
                add(totals, counts);
            }
            WindowState::Calendar { periods } => {
                match periods.binary_search_by_key(&slot, |p| p.0) {
                    Ok(pos) => add(&mut periods[pos].2, counts),
                    Err(pos) => periods.insert(pos, (slot, end, counts)),
                }
            }
        }
    }

    fn snapshot(&self, scope: &str, window_id: &str, now: u64, out: &mut Vec<u8>) {
        let held: Vec<(u64, u64, [u64; 3])> = match self {
            WindowState::Rolling { buckets, .. } => {
                // A rolling bucket's expiry only bounds the scope's life, kept in its head.
                buckets.iter().map(|&(s, c)| (s, 0, c)).collect()
            }
            WindowState::Calendar { periods } => periods.clone(),
        };
        let calendar = matches!(self, WindowState::Calendar { .. });
        for (slot, expires_at, counts) in held {
            let rec = Record::Charge {
                scope,
                now,
                counts,
                landed: vec![Landed {
                    window_id,
                    calendar,
                    slot,
                    expires_at,
                }],
            };
            rec.encode(out);
        }
    }
}

/// Whether a change is answered only once written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Write {
    /// Written before the change is answered.
    Now,
    /// Buffered, written within [`WRITE_EVERY`] or at the next [`crate::QuotaStore::durable`].
    Buffered,
}

/// Writes the buffer out every [`WRITE_EVERY`] and syncs the journal every `sync_every`,
/// until the store is dropped.
fn spawn_writer(persist: Weak<Persist>, sync_every: Option<Duration>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("quota-journal".into())
        .spawn(move || {
            let mut since_sync = Duration::ZERO;
            loop {
                std::thread::sleep(WRITE_EVERY);
                let Some(p) = persist.upgrade() else { return };
                // A failed write stays buffered; the next caller that needs it sees the error.
                let _ = p.write_pending();
                since_sync += WRITE_EVERY;
                if sync_every.is_some_and(|every| since_sync >= every) {
                    since_sync = Duration::ZERO;
                    let handle =
                        Arc::clone(&p.sync_handle.lock().unwrap_or_else(PoisonError::into_inner));
                    drop(p);
                    let _ = handle.sync_data();
                }
            }
        })
        .map(drop)
}
