//! The Nylas v3 endpoints the fake answers.
//!
//! Path parameters arrive percent-decoded (a draft id `draft%2F1%23x` is `draft/1#x`);
//! recordings keep the raw path. Grant-scoped endpoints authenticate the caller and
//! resolve the identifier first, so an unknown grant is a 404 envelope everywhere.

use axum::Router;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::download;
use crate::message::{Fields, parse_message, parse_mime, sent_message};
use crate::record::is_mime_query;
use crate::reply::{ApiError, Reply};
use crate::state::{Control, normalize_draft};

/// `Path`, with a rejection rendered as a Nylas error envelope.
struct Params<T>(T);

impl<T, S> FromRequestParts<S> for Params<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Params(value))
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}

type Answer = Result<Reply, ApiError>;

/// The Nylas routes, with a 404 envelope for everything else.
pub(crate) fn router() -> Router<Control> {
    Router::new()
        .route("/v3/grants/{grant}", get(get_grant))
        .route("/v3/grants/{grant}/messages", get(list_messages))
        .route("/v3/grants/{grant}/messages/send", post(send_message))
        .route("/v3/grants/{grant}/messages/schedules", get(list_schedules))
        .route(
            "/v3/grants/{grant}/messages/schedules/{schedule}",
            get(get_schedule).delete(cancel_schedule),
        )
        .route("/v3/grants/{grant}/messages/{message}", get(get_message))
        .route(
            "/v3/grants/{grant}/drafts",
            get(list_drafts).post(create_draft),
        )
        .route(
            "/v3/grants/{grant}/drafts/{draft}",
            get(get_draft)
                .post(send_draft)
                .put(update_draft)
                .delete(delete_draft),
        )
        .route(
            "/v3/grants/{grant}/attachments/{attachment}/download",
            get(download),
        )
        .route("/v3/domains/{domain}/messages/send", post(send_domain))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
}

async fn not_found() -> ApiError {
    ApiError::not_found("the requested resource does not exist")
}

async fn get_grant(
    State(control): State<Control>,
    Params(grant): Params<String>,
    headers: HeaderMap,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    Ok(Reply::data(grant.to_json()))
}

/// E1, E1m and E2.
async fn send_message(
    State(control): State<Control>,
    Params(grant): Params<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    let fields = if query.as_deref().is_some_and(is_mime_query) {
        parse_mime(&headers, body).await?
    } else {
        parse_message(&headers, body).await?
    };
    let data = sent_message(Some(&grant.id), &grant.email, &fields)?;
    control.store_message(&grant.id, &data);
    Ok(Reply::for_grant(&grant.id, data))
}

/// E7: a transactional send from a domain, no grant.
async fn send_domain(
    State(control): State<Control>,
    Params(domain): Params<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    control.authenticate(&headers)?;
    let fields = parse_message(&headers, body).await?;
    let mut data = sent_message(None, &format!("noreply@{domain}"), &fields)?;
    data["domain"] = Value::String(domain);
    Ok(Reply::data(data))
}

async fn list_messages(
    State(control): State<Control>,
    Params(grant): Params<String>,
    headers: HeaderMap,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    Ok(Reply::for_grant(
        &grant.id,
        Value::Array(control.messages(&grant.id)),
    ))
}

async fn get_message(
    State(control): State<Control>,
    Params((grant, message)): Params<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    let data = control
        .message(&grant.id, &message)
        .ok_or_else(|| ApiError::not_found(format!("message '{message}' not found")))?;
    Ok(Reply::for_grant(&grant.id, data))
}

async fn list_schedules(
    State(control): State<Control>,
    Params(grant): Params<String>,
    headers: HeaderMap,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    Ok(Reply::for_grant(
        &grant.id,
        Value::Array(control.schedules(&grant.id)),
    ))
}

async fn get_schedule(
    State(control): State<Control>,
    Params((grant, schedule)): Params<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    let data = control
        .schedule(&grant.id, &schedule)
        .ok_or_else(|| ApiError::not_found(format!("schedule '{schedule}' not found")))?;
    Ok(Reply::for_grant(&grant.id, data))
}

/// E6: 202 for any schedule id (known ones are marked cancelled), so a test can
/// cancel a send the fake never scheduled.
async fn cancel_schedule(
    State(control): State<Control>,
    Params((grant, schedule)): Params<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    control.cancel_schedule(&grant.id, &schedule);
    Ok(Reply::for_grant(
        &grant.id,
        json!({ "message": "Scheduled send successfully cancelled", "schedule_id": schedule }),
    )
    .with_status(StatusCode::ACCEPTED))
}

async fn list_drafts(
    State(control): State<Control>,
    Params(grant): Params<String>,
    headers: HeaderMap,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    Ok(Reply::for_grant(
        &grant.id,
        Value::Array(control.drafts(&grant.id)),
    ))
}

async fn create_draft(
    State(control): State<Control>,
    Params(grant): Params<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    let fields = parse_message(&headers, body).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let draft = control.add_draft(&grant.id, &id, Value::Object(fields));
    Ok(Reply::for_grant(&grant.id, draft))
}

async fn get_draft(
    State(control): State<Control>,
    Params((grant, draft)): Params<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    let data = find_draft(&control, &grant.id, &draft)?;
    Ok(Reply::for_grant(&grant.id, data))
}

/// `PUT` of a draft: the fields sent replace the stored ones, the rest stay.
async fn update_draft(
    State(control): State<Control>,
    Params((grant, draft)): Params<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    let Value::Object(mut stored) = find_draft(&control, &grant.id, &draft)? else {
        return Err(ApiError::bad_request("the stored draft is not an object"));
    };
    stored.extend(parse_message(&headers, body).await?);
    let updated = control.add_draft(&grant.id, &draft, Value::Object(stored));
    Ok(Reply::for_grant(&grant.id, updated))
}

fn find_draft(control: &Control, grant_id: &str, draft_id: &str) -> Result<Value, ApiError> {
    control
        .draft(grant_id, draft_id)
        .ok_or_else(|| ApiError::not_found(format!("draft '{draft_id}' not found")))
}

/// E3: sends a stored draft; the body is empty (Python) or `{}` (Node).
async fn send_draft(
    State(control): State<Control>,
    Params((grant, draft)): Params<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    if !body.iter().all(u8::is_ascii_whitespace) && serde_json::from_slice::<Value>(&body).is_err()
    {
        return Err(ApiError::bad_request("the request body is not valid JSON"));
    }
    let stored = find_draft(&control, &grant.id, &draft)?;
    let fields: Fields = match normalize_draft(&grant.id, &draft, stored) {
        Value::Object(fields) => fields,
        _ => Fields::new(),
    };
    let mut data = sent_message(Some(&grant.id), &grant.email, &fields)?;
    data["draft_id"] = Value::String(draft);
    control.store_message(&grant.id, &data);
    Ok(Reply::for_grant(&grant.id, data))
}

async fn delete_draft(
    State(control): State<Control>,
    Params((grant, draft)): Params<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let grant = control.authorize_grant(&headers, &grant)?;
    if !control.remove_draft(&grant.id, &draft) {
        return Err(ApiError::not_found(format!("draft '{draft}' not found")));
    }
    Ok(Reply::for_grant(&grant.id, json!({})))
}

/// Streams `?size=N` pattern bytes (see [`crate::download_byte`]).
async fn download(
    State(control): State<Control>,
    Params((grant, attachment)): Params<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    control.authorize_grant(&headers, &grant)?;
    let size = download::requested_size(query.as_deref()).map_err(ApiError::bad_request)?;
    Ok(download::response(size, &attachment).into_response())
}
