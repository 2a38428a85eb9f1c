//! The control API under `/__fake/`: drive a fake in another process from a shell.
//!
//! Same operations as [`Control`]; see the crate README for curl examples. These
//! requests are never recorded nor subject to rules. Errors are
//! `{"error": "<message>"}` with status 400.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::behavior::Rule;
use crate::grants::Grant;
use crate::state::Control;

/// A control API failure: 400 with `{"error": ...}`.
#[derive(Debug)]
struct ControlError(String);

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": self.0 })),
        )
            .into_response()
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(body).map_err(|err| ControlError(format!("invalid JSON body: {err}")))
}

/// The `/__fake/` routes.
pub(crate) fn router() -> Router<Control> {
    Router::new()
        .route(
            "/__fake/requests",
            get(list_requests).delete(clear_requests),
        )
        .route("/__fake/sends", get(list_sends))
        .route(
            "/__fake/behavior",
            get(list_rules).post(add_rules).delete(clear_rules),
        )
        .route("/__fake/grants", get(list_grants).post(add_grant))
        .route("/__fake/tokens", post(add_token))
        .route("/__fake/drafts", post(add_draft))
        .route("/__fake/config", get(get_config).post(set_config))
        .route("/__fake/stats", get(stats))
        .route("/__fake/reset", post(reset))
}

#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    /// Include bodies (as lossy UTF-8) in the listing.
    #[serde(default)]
    bodies: bool,
}

async fn list_requests(
    State(control): State<Control>,
    Query(query): Query<ListQuery>,
) -> axum::Json<Value> {
    let list = control
        .requests()
        .iter()
        .map(|r| r.summary(query.bodies))
        .collect();
    axum::Json(Value::Array(list))
}

async fn list_sends(
    State(control): State<Control>,
    Query(query): Query<ListQuery>,
) -> axum::Json<Value> {
    let list = control
        .sends()
        .iter()
        .map(|r| r.summary(query.bodies))
        .collect();
    axum::Json(Value::Array(list))
}

async fn clear_requests(State(control): State<Control>) -> StatusCode {
    control.clear();
    StatusCode::NO_CONTENT
}

async fn list_rules(State(control): State<Control>) -> axum::Json<Vec<Rule>> {
    axum::Json(control.rules())
}

async fn add_rules(
    State(control): State<Control>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Vec<Rule>>), ControlError> {
    // One rule or a list of rules; parsed apart for precise error messages.
    let rules = match parse::<Value>(&body)? {
        list @ Value::Array(_) => serde_json::from_value::<Vec<Rule>>(list),
        one => serde_json::from_value::<Rule>(one).map(|rule| vec![rule]),
    }
    .map_err(|err| ControlError(format!("invalid rule: {err}")))?;
    for rule in &rules {
        rule.validate()
            .map_err(|err| ControlError(err.to_string()))?;
    }
    for rule in rules {
        control
            .add_rule(rule)
            .map_err(|err| ControlError(err.to_string()))?;
    }
    Ok((StatusCode::CREATED, axum::Json(control.rules())))
}

async fn clear_rules(State(control): State<Control>) -> StatusCode {
    control.clear_rules();
    StatusCode::NO_CONTENT
}

async fn list_grants(State(control): State<Control>) -> axum::Json<Vec<Grant>> {
    axum::Json(control.grants())
}

async fn add_grant(
    State(control): State<Control>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Grant>), ControlError> {
    let grant = control.add_grant(parse(&body)?);
    Ok((StatusCode::CREATED, axum::Json(grant)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    token: String,
    grant_id: String,
}

async fn add_token(
    State(control): State<Control>,
    body: Bytes,
) -> Result<StatusCode, ControlError> {
    let request: TokenRequest = parse(&body)?;
    // Any identifier form names the grant; the token maps to its canonical id.
    let grant_id = control
        .canonical_grant(&request.grant_id, None)
        .ok_or_else(|| ControlError(format!("grant '{}' not found", request.grant_id)))?;
    control.add_access_token(request.token, grant_id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DraftRequest {
    grant_id: String,
    #[serde(default)]
    draft_id: Option<String>,
    #[serde(default)]
    draft: Value,
}

async fn add_draft(
    State(control): State<Control>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Value>), ControlError> {
    let request: DraftRequest = parse(&body)?;
    let draft_id = request
        .draft_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let draft = control.add_draft(&request.grant_id, &draft_id, request.draft);
    Ok((StatusCode::CREATED, axum::Json(draft)))
}

async fn get_config(State(control): State<Control>) -> axum::Json<Value> {
    axum::Json(control.config())
}

/// Sets the keys present: `record_bodies` (bool), `record_limit` (number or null),
/// `api_key` (string or null).
async fn set_config(
    State(control): State<Control>,
    body: Bytes,
) -> Result<axum::Json<Value>, ControlError> {
    let Value::Object(changes) = parse::<Value>(&body)? else {
        return Err(ControlError("the config must be a JSON object".into()));
    };
    let bad = |key: &str| ControlError(format!("invalid value for config key '{key}'"));
    // Check every key before applying any, so a typo changes nothing.
    let mut record_bodies = None;
    let mut record_limit = None;
    let mut api_key = None;
    for (key, value) in &changes {
        match key.as_str() {
            "record_bodies" => record_bodies = Some(value.as_bool().ok_or_else(|| bad(key))?),
            "record_limit" => {
                record_limit = Some(match value {
                    Value::Null => None,
                    value => Some(
                        value
                            .as_u64()
                            .and_then(|n| usize::try_from(n).ok())
                            .ok_or_else(|| bad(key))?,
                    ),
                });
            }
            "api_key" => {
                api_key = Some(match value {
                    Value::Null => None,
                    Value::String(key) => Some(key.clone()),
                    _ => return Err(bad(key)),
                });
            }
            other => return Err(ControlError(format!("unknown config key '{other}'"))),
        }
    }
    if let Some(on) = record_bodies {
        control.set_record_bodies(on);
    }
    if let Some(limit) = record_limit {
        control.set_record_limit(limit);
    }
    if let Some(key) = api_key {
        control.set_api_key(key);
    }
    Ok(axum::Json(control.config()))
}

async fn stats(State(control): State<Control>) -> axum::Json<crate::Stats> {
    axum::Json(control.stats())
}

async fn reset(State(control): State<Control>) -> StatusCode {
    control.reset();
    StatusCode::NO_CONTENT
}
