//! End to end: a draft's send and a change of the same draft never overlap, so Nylas sends
//! what was counted.

mod common;

use common::{Gateway, TOKEN, WAIT, client, config, draft_send_in_flight, fake};
use fake_nylas::DEMO_GRANT_ID;
use serde_json::{Value, json};

#[tokio::test]
async fn a_draft_change_waits_for_the_send_of_that_draft_to_settle() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    nylas.add_draft(
        DEMO_GRANT_ID,
        "d1",
        json!({"to": [{"email": "a@example.org"}], "subject": "saved"}),
    );
    // Nylas takes a while to send: the send is in flight when the change comes.
    let send = draft_send_in_flight(&gw, &nylas, "d1").await;
    let url = format!("{}/v3/grants/{DEMO_GRANT_ID}/drafts/d1", gw.url);
    let five: Vec<Value> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| json!({"email": format!("{n}@example.org")}))
        .collect();
    let change = client()
        .put(&url)
        .bearer_auth(TOKEN)
        .json(&json!({ "to": five }))
        .send();
    let change = tokio::time::timeout(WAIT, change).await.unwrap().unwrap();
    assert_eq!(change.status(), 200);
    let (status, sent) = tokio::time::timeout(WAIT, send).await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        sent["data"]["to"].as_array().map(Vec::len),
        Some(1),
        "Nylas sent the draft that was counted: {sent}"
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 1));

    // The next send is counted from the changed draft.
    let resp = client().post(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (2, 6));
}
