//! Get and Set over gRPC: found and not found, and every limit.

use kvstore::pb::change_event::ChangeType;
use kvstore::pb::{
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, ListRequest, ListResponse, SetRequest,
    SubscribeRequest,
};
use tonic::Code;

use crate::helpers::spawn_server;

fn set(key: &str, value: &str) -> SetRequest {
    SetRequest {
        key: key.into(),
        value: value.into(),
        ..SetRequest::default()
    }
}

fn get(key: &str) -> GetRequest {
    GetRequest { key: key.into() }
}

#[tokio::test]
async fn set_then_get_returns_the_value() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let reply = client
        .set(set("user:1", "Alice"))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.success);
    assert!(!reply.message.is_empty());
    client.set(set("user:1", "Bob")).await.unwrap();
    let got = client.get(get("user:1")).await.unwrap().into_inner();
    assert_eq!((got.value.as_str(), got.found), ("Bob", true));
    server.shutdown().await;
}

#[tokio::test]
async fn get_of_a_missing_key_is_not_found_and_empty() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let got = client.get(get("nobody")).await.unwrap().into_inner();
    assert_eq!(
        got,
        GetResponse::default(),
        "revision 0: nothing was ever written"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_empty_value_is_a_value() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    client.set(set("empty", "")).await.unwrap();
    let got = client.get(get("empty")).await.unwrap().into_inner();
    assert!(got.found);
    assert_eq!(got.value, "");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_keys_and_values_are_refused_with_the_limit_named_and_nothing_stored() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let long_key = "k".repeat(4097);
    let long_value = "v".repeat(1024 * 1024 + 1);
    let cases = [
        (set("", "v"), "empty"),
        (set(&long_key, "v"), "limits.max_key_bytes"),
        (set("big", &long_value), "limits.max_value_bytes"),
    ];
    for (request, says) in cases {
        let status = client.set(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(says), "{}", status.message());
    }
    assert!(server.store.is_empty());
    for key in ["", long_key.as_str()] {
        let status = client.get(get(key)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn keys_and_values_at_the_limits_are_stored() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let key = "k".repeat(4096);
    let value = "v".repeat(1024 * 1024);
    client.set(set(&key, &value)).await.unwrap();
    let got = client.get(get(&key)).await.unwrap().into_inner();
    assert_eq!(got.value.len(), value.len());
    server.shutdown().await;
}

#[tokio::test]
async fn a_message_far_over_the_limit_gets_a_status_and_the_connection_keeps_working() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let huge = "v".repeat(8 * 1024 * 1024);
    let status = client.set(set("huge", &huge)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // The same channel still serves.
    client.set(set("after", "ok")).await.unwrap();
    assert!(client.get(get("after")).await.unwrap().into_inner().found);
    assert!(!client.get(get("huge")).await.unwrap().into_inner().found);
    server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_method_is_unimplemented() {
    let server = spawn_server().await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    for path in ["/kvstore.KeyValueStore/Nope", "/other.Service/Get"] {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary::<GetRequest, GetResponse, _>(
                tonic::Request::new(get("a")),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{path}");
    }
    server.shutdown().await;
}

fn guarded(key: &str, value: &str, expected: i64) -> SetRequest {
    SetRequest {
        expected_mod_revision: Some(expected),
        ..set(key, value)
    }
}

fn delete(key: &str, expected: Option<i64>) -> DeleteRequest {
    DeleteRequest {
        key: key.into(),
        expected_mod_revision: expected,
    }
}

#[tokio::test]
async fn every_change_gets_the_next_revision_and_keys_carry_theirs() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let first = client.set(set("a", "1")).await.unwrap().into_inner();
    assert_eq!(
        (first.revision, first.message.as_str()),
        (1, "stored at revision 1")
    );
    client.set(set("b", "1")).await.unwrap();
    assert_eq!(
        client
            .set(set("a", "2"))
            .await
            .unwrap()
            .into_inner()
            .revision,
        3
    );
    let a = client.get(get("a")).await.unwrap().into_inner();
    assert_eq!(
        (a.create_revision, a.mod_revision, a.version, a.revision),
        (1, 3, 2, 3)
    );
    let missing = client.get(get("zz")).await.unwrap().into_inner();
    assert_eq!(
        (missing.found, missing.mod_revision, missing.revision),
        (false, 0, 3)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn delete_says_whether_the_key_existed() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    client.set(set("d", "v")).await.unwrap();
    let deleted = client.delete(delete("d", None)).await.unwrap().into_inner();
    assert_eq!(
        deleted,
        DeleteResponse {
            deleted: true,
            prev_mod_revision: 1,
            revision: 2
        }
    );
    assert!(!client.get(get("d")).await.unwrap().into_inner().found);
    let again = client.delete(delete("d", None)).await.unwrap().into_inner();
    assert_eq!(
        again,
        DeleteResponse {
            deleted: false,
            prev_mod_revision: 0,
            revision: 2
        }
    );
    let status = client.delete(delete("", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn compare_and_set_fails_with_the_current_revision_and_changes_nothing() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    assert_eq!(
        client
            .set(guarded("c", "first", 0))
            .await
            .unwrap()
            .into_inner()
            .revision,
        1
    );
    let status = client.set(guarded("c", "second", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("mod_revision 1"),
        "{}",
        status.message()
    );
    assert_eq!(status.metadata().get("kvstore-mod-revision").unwrap(), "1");
    let status = client.set(guarded("c", "second", 7)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        client.get(get("c")).await.unwrap().into_inner().value,
        "first"
    );
    assert_eq!(
        client
            .set(guarded("c", "second", 1))
            .await
            .unwrap()
            .into_inner()
            .revision,
        2
    );

    let status = client.delete(delete("c", Some(1))).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.metadata().get("kvstore-mod-revision").unwrap(), "2");
    assert!(
        client
            .delete(delete("c", Some(2)))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    let status = client.set(guarded("c", "x", -1)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_with_a_ttl_reports_it_and_is_gone_when_it_runs_out() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let ttl = |key: &str, ms: i64| SetRequest {
        ttl_ms: ms,
        ..set(key, "v")
    };
    client.set(ttl("long", 60_000)).await.unwrap();
    let long = client.get(get("long")).await.unwrap().into_inner();
    assert!(
        long.ttl_ms > 50_000 && long.ttl_ms <= 60_000,
        "{}",
        long.ttl_ms
    );
    for bad in [-1, i64::MAX] {
        let status = client.set(ttl("bad", bad)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
    }
    // The expiry is observed through its event rather than by sleeping.
    let mut events = client
        .subscribe(SubscribeRequest {
            key_pattern: "short".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    client.set(ttl("short", 50)).await.unwrap();
    let set_event = events.message().await.unwrap().unwrap();
    let expiry = tokio::time::timeout(crate::helpers::PATIENCE, events.message())
        .await
        .expect("the expiry is published promptly")
        .unwrap()
        .unwrap();
    assert_eq!(expiry.change_type(), ChangeType::Delete);
    assert!(expiry.expired);
    assert_eq!(expiry.revision, set_event.revision + 1);
    assert!(!client.get(get("short")).await.unwrap().into_inner().found);
    server.shutdown().await;
}

#[tokio::test]
async fn list_pages_through_a_prefix_in_key_order() {
    let mut settings = crate::helpers::test_settings();
    settings.limits.max_page = 3;
    let server = crate::helpers::spawn_with(settings).await;
    let mut client = server.client().await;
    for key in ["u/3", "u/1", "v/1", "u/2", "t/1", "u/4"] {
        client.set(set(key, key)).await.unwrap();
    }
    let list = |prefix: &str, limit: u32, start_after: &str| ListRequest {
        prefix: prefix.into(),
        limit,
        start_after: start_after.into(),
    };
    let first = client.list(list("u/", 2, "")).await.unwrap().into_inner();
    let keys = |page: &ListResponse| {
        page.items
            .iter()
            .map(|kv| kv.key.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&first), ["u/1", "u/2"]);
    assert!(first.more);
    assert_eq!(first.next_start_after, "u/2");
    assert_eq!(first.revision, 6);
    assert_eq!(first.items[0].value, "u/1");
    assert_eq!(first.items[0].mod_revision, 2);
    let second = client
        .list(list("u/", 2, &first.next_start_after))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&second), ["u/3", "u/4"]);
    assert!(!second.more);
    assert_eq!(second.next_start_after, "");
    // A limit of 0 means the default, capped by limits.max_page (3 here).
    let capped = client.list(list("", 0, "")).await.unwrap().into_inner();
    assert_eq!(keys(&capped), ["t/1", "u/1", "u/2"]);
    assert!(capped.more);
    let status = client
        .list(list(&"p".repeat(5000), 0, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn a_batch_applies_its_ops_in_order_and_publishes_each_change() {
    use kvstore::pb::{BatchOp, BatchRequest, batch_op::Op, batch_result::Result as R};
    let server = spawn_server().await;
    let mut client = server.client().await;
    let mut events = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let op = |op| BatchOp { op: Some(op) };
    let ops = vec![
        op(Op::Set(set("a", "1"))),
        op(Op::Set(guarded("b", "2", 0))),
        op(Op::Set(guarded("a", "3", 9))),
        op(Op::Get(get("a"))),
        op(Op::Delete(delete("b", None))),
    ];
    let reply = client
        .batch(BatchRequest { ops })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.revision, 3);
    let results: Vec<R> = reply
        .results
        .into_iter()
        .map(|r| r.result.unwrap())
        .collect();
    assert!(matches!(&results[0], R::Set(s) if s.revision == 1));
    assert!(matches!(&results[1], R::Set(s) if s.revision == 2));
    assert!(
        matches!(&results[2], R::Conflict(c) if c.mod_revision == 1 && c.message.contains("expected 9"))
    );
    assert!(matches!(&results[3], R::Get(g) if g.value == "1" && g.found));
    assert!(matches!(&results[4], R::Delete(d) if d.deleted && d.revision == 3));
    for revision in 1..=3 {
        assert_eq!(events.message().await.unwrap().unwrap().revision, revision);
    }

    // One invalid op refuses the whole batch, naming it; nothing is applied.
    let ops = vec![op(Op::Set(set("c", "1"))), op(Op::Set(set("", "1")))];
    let status = client.batch(BatchRequest { ops }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("op 1: key must not be empty"),
        "{}",
        status.message()
    );
    let empty = vec![BatchOp { op: None }];
    let status = client.batch(BatchRequest { ops: empty }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let too_many = vec![op(Op::Get(get("a"))); 10_001];
    let status = client
        .batch(BatchRequest { ops: too_many })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "batch has 10001 ops, over the limit of 10000 (limits.max_batch_ops)"
    );
    assert!(!client.get(get("c")).await.unwrap().into_inner().found);
    server.shutdown().await;
}
