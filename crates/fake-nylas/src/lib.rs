//! A fake Nylas v3 API for send-gateway's end-to-end tests, load benchmarks and
//! local trials.
//!
//! It answers the send endpoints (E1, E1m, E2, E3, E6, E7 of nylas-api.md), grant
//! lookups for every identifier form, drafts, messages and a deterministic
//! attachment download, with Nylas's envelopes and `X-Request-Id`. It records every
//! request (raw path, headers, body, and whether the body arrived whole) and can be
//! made to misbehave: forced statuses, delays, idempotent replays. Everything is
//! driven through [`Control`] in-process or the `/__fake/` HTTP API from outside.
//!
//! # Layout
//! - `server`: [`FakeNylas`] (socket, task, shutdown) and [`app`] (the router).
//! - `state`: [`Control`], the shared state and the methods that drive it.
//! - `intercept`: the middleware that records, applies rules and replays.
//! - `nylas`: the Nylas v3 routes.
//! - `message`: reading JSON, multipart and MIME sends; the message answered.
//! - `grants`: [`Grant`], the registry and identifier resolution.
//! - `behavior`: [`Rule`], forced answers and delays.
//! - `idempotency`: the `Idempotency-Key` store.
//! - `record`: [`Recorded`], [`SendKind`], [`Stats`].
//! - `reply`: envelopes, errors and the request id.
//! - `download`: the streamed attachment pattern.
//! - `control_api`: the `/__fake/` routes.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use fake_nylas::{FakeNylas, Rule, DEMO_GRANT_ID};
//!
//! let fake = FakeNylas::start("127.0.0.1:0".parse().unwrap()).await?;
//! fake.add_rule(Rule::rate_limited(30).path("/messages/send").times(1)).unwrap();
//! // ... point the gateway at fake.url() and send through it ...
//! assert!(fake.delivered().is_empty());
//! fake.shutdown().await;
//! # Ok(()) }
//! ```

mod behavior;
mod control_api;
mod download;
mod grants;
mod idempotency;
mod intercept;
mod message;
mod nylas;
mod record;
mod reply;
mod server;
mod state;

pub use behavior::{Rule, RuleError};
pub use download::{DEFAULT_DOWNLOAD_SIZE, download_byte, download_pattern};
pub use grants::{DEMO_GRANT_EMAIL, DEMO_GRANT_EXTERNAL_ID, DEMO_GRANT_ID, Grant};
pub use idempotency::{IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_RESPONSE_HEADER};
pub use record::{Recorded, SendKind, Stats};
pub use reply::REQUEST_ID_HEADER;
pub use server::{FakeNylas, app};
pub use state::Control;
