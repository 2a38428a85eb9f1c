//! send-gateway: a proxy in front of the Nylas v3 API that lets a send through only when the
//! sending grant stays inside its provider's limits.
//!
//! `main.rs` parses the command line, loads the configuration and calls [`serve`]; tests
//! drive the same [`run`] on `127.0.0.1:0`.
//!
//! # Layout
//! A request's way, in order:
//! - [`server`]: the listeners, the layers around them, signals and the drain.
//! - `listener`: each listener's accept loop, with the limits on a request's head.
//! - [`tls`]: the listeners' HTTPS (rustls), its certificate reloaded on SIGHUP.
//! - [`request_id`]: the outermost layer: one id, one span, one log line per gateway error.
//! - [`body_timeout`]: the next layer: a request body that stalls fails.
//! - [`proxy`]: routes a request: a send goes through the [`pipeline`], the rest is relayed.
//! - [`clients`]: with `[[clients]]`, who the caller is (401 otherwise), what it may use
//!   (403 otherwise), and the gateway's Nylas key in place of its token.
//! - [`pipeline`]: the send path, one phase per file: who is charged → what it costs →
//!   admit → forward → settle → report.
//! - [`lease`]: an admitted charge that must be kept or released.
//! - [`upstream`]: the one upstream client and header hygiene.
//! - [`error`]: gateway errors as Nylas-shaped JSON responses, in one place.
//!
//! What the phases use:
//! - [`send`]: which requests send mail, and what a send costs (pure logic and body streaming).
//! - [`grants`]: canonical grant ids from any identifier form, cached.
//! - [`drafts`]: the lock that keeps a draft's send and its changes from overlapping.
//! - [`selection`]: which profile a grant is charged under (override, provider, default).
//! - [`scope`]: the quota scope a send is charged to.
//! - [`schedules`]: scheduled sends' charges, remembered by schedule id for cancels and
//!   failure webhooks to give back.
//! - [`events`]: threshold events (80 % and 100 % of a window) and their webhook.
//! - [`ratelimit`]: `RateLimit-Policy` and `RateLimit` headers.
//! - [`metrics`]: Prometheus metrics.
//! - [`fleet`]: every charge noted in the store's fleet index, off the send's path.
//! - [`health`]: the store watched once a second (breaker, persistence, restarts), and the
//!   local budget written back when it returns.
//!
//! And around them: [`config`] (the configuration and its validation), [`state`] (what
//! every request shares), [`admin`] (health, readiness, metrics and the quota API, with
//! [`explain`], its dry run of a send, and [`fleet_view`], the busiest scopes), [`webhooks`] (Nylas's outcome webhooks for
//! scheduled sends).

pub mod admin;
pub mod body_timeout;
pub mod clients;
pub mod config;
pub mod drafts;
pub mod error;
pub mod events;
pub mod explain;
pub mod fleet;
pub mod fleet_view;
pub mod grants;
pub mod health;
pub mod lease;
mod listener;
pub mod metrics;
pub mod pipeline;
pub mod proxy;
pub mod ratelimit;
pub mod request_id;
pub mod schedules;
pub mod scope;
pub mod selection;
pub mod send;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod webhooks;

pub use server::{app, run, run_with_webhooks, serve, shutdown_signal};
pub use state::AppState;
