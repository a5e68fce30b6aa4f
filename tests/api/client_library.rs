//! The client library, `kvstore::client`, against real servers: every call, paging, failover
//! between endpoints, a subscription that resumes after its connection is cut or its server
//! drains, what it must not hide (lag, compacted history), and which calls it retries.

use std::time::Duration;

use futures_util::StreamExt;
use kvstore::client::{
    BatchOp, BatchResult, ChangeKind, Client, DeleteOptions, Error, Event, ListOptions, Page,
    RetryPolicy, SetOptions, SubscribeOptions, Subscription, Tls,
};
use kvstore::store::SetOptions as StoreSetOptions;
use kvstore::token::BearerToken;
use tokio::time::timeout;
use tonic::Code;

use crate::auth::{READER, WRITER, auth_settings};
use crate::helpers::{PATIENCE, Proxy, TestServer, spawn_server, spawn_with, test_settings};
use crate::tls::Pki;

async fn connect(endpoints: &[String]) -> Client {
    Client::builder(endpoints.iter().cloned())
        .connect()
        .await
        .expect("connecting to the test server")
}

/// An address nothing listens on: connecting to it is refused.
fn refusing_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    format!("http://{}", listener.local_addr().unwrap())
}

/// The next item of a subscription, within [`PATIENCE`].
async fn next(subscription: &mut Subscription) -> Result<Event, Error> {
    timeout(PATIENCE, subscription.next())
        .await
        .expect("an event in time")
        .expect("a subscription never ends without an error")
}

/// The next change's revision, key and value, failing on anything else.
async fn next_change(subscription: &mut Subscription) -> (i64, String, String) {
    match next(subscription).await {
        Ok(Event::Change(change)) => (change.revision, change.key, change.value),
        other => panic!("expected a change, got {other:?}"),
    }
}

/// Writes `key:{i:04} = {i}` straight into the store; on a fresh server, each at revision `i`.
/// A test runs on one thread, so the server forwards none of these changes before the burst
/// ends: a subscriber with a small buffer lags.
fn burst(server: &TestServer, revisions: std::ops::RangeInclusive<i64>) {
    for i in revisions {
        server
            .store
            .set(
                format!("key:{i:04}"),
                i.to_string(),
                StoreSetOptions::default(),
            )
            .expect("an unguarded set");
    }
}

#[tokio::test]
async fn every_call_works_against_a_real_server() {
    let server = spawn_server().await;
    let client = connect(&[server.grpc_url()]).await;

    let missing = client.get("user:1").await.unwrap();
    assert_eq!((missing.kv, missing.revision), (None, 0));

    let stored = client.set("user:1", "Alice").await.unwrap();
    assert_eq!(stored.revision, 1);
    let read = client.get("user:1").await.unwrap();
    let kv = read.kv.expect("the key exists");
    assert_eq!(
        (
            kv.key.as_str(),
            kv.value.as_str(),
            kv.create_revision,
            kv.mod_revision
        ),
        ("user:1", "Alice", 1, 1)
    );
    assert_eq!((kv.version, kv.ttl, read.revision), (1, None, 1));

    // Compare-and-set on mod_revision: the stale one is refused with the current revision.
    let updated = client
        .set_with("user:1", "Alicia", SetOptions::new().if_mod_revision(1))
        .await
        .unwrap();
    assert_eq!(updated.revision, 2);
    match client
        .set_with("user:1", "Alex", SetOptions::new().if_mod_revision(1))
        .await
    {
        Err(err @ Error::Conflict { .. }) => {
            assert_eq!(err.code(), Code::FailedPrecondition);
            assert!(matches!(
                err,
                Error::Conflict {
                    current_mod_revision: Some(2),
                    ..
                }
            ));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }

    // Create-only, and a TTL.
    let created = client
        .set_with(
            "user:2",
            "Bob",
            SetOptions::new().if_absent().ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(created.revision, 3);
    let again = client
        .set_with("user:2", "Bob", SetOptions::new().if_absent())
        .await;
    assert!(
        matches!(
            again,
            Err(Error::Conflict {
                current_mod_revision: Some(3),
                ..
            })
        ),
        "{again:?}"
    );
    let ttl = client.get("user:2").await.unwrap().kv.unwrap().ttl.unwrap();
    assert!(
        ttl > Duration::from_secs(50) && ttl <= Duration::from_secs(60),
        "{ttl:?}"
    );

    // A guarded delete that does not match changes nothing; an unguarded one removes.
    let guarded = client
        .delete_with("user:1", DeleteOptions::new().if_mod_revision(1))
        .await;
    assert!(
        matches!(guarded, Err(Error::Conflict { .. })),
        "{guarded:?}"
    );
    let deleted = client.delete("user:1").await.unwrap();
    assert!(deleted.deleted);
    assert_eq!((deleted.prev_mod_revision, deleted.revision), (2, 4));
    let nothing = client.delete("user:1").await.unwrap();
    assert!(!nothing.deleted);

    // A bad key is the server's INVALID_ARGUMENT, not retried.
    let empty = client.set("", "x").await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);

    let batch = client
        .batch([
            BatchOp::set("b:1", "one"),
            BatchOp::get("b:1"),
            BatchOp::Set {
                key: "b:1".into(),
                value: "uno".into(),
                options: SetOptions::new().if_absent(),
            },
            BatchOp::delete("b:1"),
            BatchOp::get("b:1"),
        ])
        .await
        .unwrap();
    assert_eq!(batch.revision, 6);
    let [set, get, conflict, delete, gone] = batch.results.as_slice() else {
        panic!("one result per op: {batch:?}");
    };
    assert!(
        matches!(set, BatchResult::Set(set) if set.revision == 5),
        "{set:?}"
    );
    assert!(
        matches!(get, BatchResult::Get(get) if get.kv.as_ref().is_some_and(|kv| kv.value == "one")),
        "{get:?}"
    );
    assert!(
        matches!(
            conflict,
            BatchResult::Conflict {
                mod_revision: 5,
                ..
            }
        ),
        "{conflict:?}"
    );
    assert!(
        matches!(delete, BatchResult::Delete(delete) if delete.deleted && delete.revision == 6),
        "{delete:?}"
    );
    assert!(
        matches!(gone, BatchResult::Get(get) if get.kv.is_none()),
        "{gone:?}"
    );

    assert_eq!(client.revision().await.unwrap(), 6);
    assert_eq!(
        client.health().await.unwrap(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // Subscribe from a revision: the replay, then live changes.
    let mut changes = client
        .subscribe("user:", SubscribeOptions::new().start_revision(3))
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut changes).await,
        (3, "user:2".into(), "Bob".into())
    );
    match next(&mut changes).await {
        Ok(Event::Change(change)) => {
            assert_eq!(
                (change.kind, change.key.as_str()),
                (ChangeKind::Delete, "user:1")
            );
        }
        other => panic!("expected the delete, got {other:?}"),
    }
    client.set("user:3", "Carol").await.unwrap();
    assert_eq!(
        next_change(&mut changes).await,
        (7, "user:3".into(), "Carol".into())
    );

    // With `initial`: the current values, then PROGRESS at the snapshot's revision.
    let mut snapshot = client
        .subscribe("user:", SubscribeOptions::new().initial())
        .await
        .unwrap();
    for key in ["user:2", "user:3"] {
        match next(&mut snapshot).await {
            Ok(Event::Change(change)) => assert!(change.initial && change.key == key),
            other => panic!("expected {key} of the snapshot, got {other:?}"),
        }
    }
    assert!(matches!(
        next(&mut snapshot).await,
        Ok(Event::Progress { revision: 7 })
    ));

    drop((changes, snapshot));
    server.shutdown().await;
}

#[tokio::test]
async fn a_token_and_tls_with_a_client_certificate_are_sent() {
    let server = spawn_with(auth_settings()).await;
    let url = server.grpc_url();
    let anonymous = connect(std::slice::from_ref(&url)).await;
    let refused = anonymous.get("t").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let reader = Client::builder([url.clone()])
        .token(BearerToken::parse(READER).unwrap())
        .connect()
        .await
        .unwrap();
    let denied = reader.set("t", "v").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let writer = Client::builder([url])
        .token(BearerToken::parse(WRITER).unwrap())
        .connect()
        .await
        .unwrap();
    writer.set("t", "v").await.unwrap();
    assert!(reader.get("t").await.unwrap().kv.is_some());
    server.shutdown().await;

    let pki = Pki::new("library");
    let server = spawn_with(pki.settings(true)).await;
    let read = |name: &str| std::fs::read(pki.path(name)).unwrap();
    let tls = Tls::new()
        .ca_certificate(read("ca.pem"))
        .unwrap()
        .identity(read("client.pem"), read("client.key"));
    let client = Client::builder([server.grpc_addr.to_string()])
        .tls(tls.clone())
        .connect()
        .await
        .unwrap();
    client.set("tls/1", "Alice").await.unwrap();
    // The certificate names 127.0.0.1 and localhost: any other name is refused.
    let misnamed = Client::builder([server.grpc_addr.to_string()])
        .tls(tls.server_name("elsewhere.example"))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(misnamed, Error::Connect(_)), "{misnamed:?}");
    // A CA file without a certificate is refused before any connection.
    let not_pem = Tls::new().ca_certificate("not a certificate").unwrap_err();
    assert_eq!(not_pem.code(), Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn list_follows_the_cursor_over_several_pages() {
    let server = spawn_server().await;
    let client = connect(&[server.grpc_url()]).await;
    for i in 0..25 {
        client
            .set(format!("k/{i:02}"), i.to_string())
            .await
            .unwrap();
    }
    client.set("other", "x").await.unwrap();

    let pages: Vec<Page> = client
        .list("k/", ListOptions::new().page_size(10))
        .map(|page| page.expect("a page"))
        .collect()
        .await;
    let sizes: Vec<usize> = pages.iter().map(|page| page.items.len()).collect();
    assert_eq!(sizes, [10, 10, 5]);
    let keys: Vec<String> = pages
        .iter()
        .flat_map(|page| page.items.iter().map(|kv| kv.key.clone()))
        .collect();
    let expected: Vec<String> = (0..25).map(|i| format!("k/{i:02}")).collect();
    assert_eq!(keys, expected, "every key once, in order");
    assert!(pages.iter().all(|page| page.revision == 26));

    // A limit asks for no more than it needs, and a listing can continue after a key.
    let limited: Vec<Page> = client
        .list(
            "k/",
            ListOptions::new()
                .page_size(10)
                .limit(15)
                .start_after("k/04"),
        )
        .map(|page| page.expect("a page"))
        .collect()
        .await;
    let keys: Vec<&str> = limited
        .iter()
        .flat_map(|page| page.items.iter().map(|kv| kv.key.as_str()))
        .collect();
    assert_eq!(keys.len(), 15);
    assert_eq!((keys[0], keys[14]), ("k/05", "k/19"));
    server.shutdown().await;
}

#[tokio::test]
async fn connect_fails_over_to_the_second_endpoint_when_the_first_refuses() {
    let server = spawn_server().await;
    let refusing = refusing_addr();
    let client = connect(&[refusing.clone(), server.grpc_url()]).await;
    client.set("user:1", "Alice").await.unwrap();
    assert!(client.get("user:1").await.unwrap().kv.is_some());

    // When none accepts, the error names each endpoint.
    let nowhere = Client::builder([refusing.clone(), refusing_addr()])
        .connect()
        .await
        .unwrap_err();
    assert_eq!(nowhere.code(), Code::Unavailable);
    assert!(matches!(&nowhere, Error::Connect(failures) if failures.len() == 2));
    assert!(
        nowhere
            .to_string()
            .starts_with(&format!("cannot reach server at {refusing}: ")),
        "{nowhere}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_write_moves_to_the_next_endpoint_when_the_first_goes_away() {
    let first = spawn_server().await;
    let second = spawn_server().await;
    let client = connect(&[first.grpc_url(), second.grpc_url()]).await;
    client.set("user:1", "Alice").await.unwrap();
    assert_eq!(first.store.revision(), 1);
    first.shutdown().await;

    // The first endpoint now refuses connections: the write was never sent there, so it is
    // sent to the second.
    let stored = client.set("user:1", "Bob").await.unwrap();
    assert_eq!(stored.revision, 1, "the second server's first write");
    assert_eq!(second.store.revision(), 1);
    assert_eq!(client.get("user:1").await.unwrap().kv.unwrap().value, "Bob");
    second.shutdown().await;
}

#[tokio::test]
async fn a_write_that_may_have_been_applied_is_not_retried_but_a_read_is() {
    let server = spawn_server().await;
    let proxy = Proxy::start(server.grpc_addr).await;
    // Through the proxy first; the server itself is the second endpoint.
    let client = connect(&[format!("http://{}", proxy.addr), server.grpc_url()]).await;
    client.set("user:1", "Alice").await.unwrap();

    proxy.swallow_replies();
    let write = tokio::spawn({
        let client = client.clone();
        async move { client.set("user:1", "Bob").await }
    });
    // The set reaches the server and is applied; its answer is lost with the connection.
    timeout(PATIENCE, async {
        while server.store.revision() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the set reaches the server");
    proxy.cut().await;
    let err = timeout(PATIENCE, write)
        .await
        .expect("the set fails in time")
        .unwrap()
        .expect_err("the answer never came");
    assert!(err.status().is_some(), "{err:?}");
    assert_ne!(err.code(), Code::Ok);
    // Applied once, and not repeated on the second endpoint.
    assert_eq!(server.store.revision(), 2);
    let kv = client.get("user:1").await.unwrap().kv.unwrap();
    assert_eq!((kv.value.as_str(), kv.version), ("Bob", 2));

    // A read cut off the same way is asked again, at the next endpoint. The client is on
    // the second endpoint now, so a new client starts on the proxy again.
    let client = connect(&[format!("http://{}", proxy.addr), server.grpc_url()]).await;
    proxy.swallow_replies();
    let read = tokio::spawn({
        let client = client.clone();
        async move { client.get("user:1").await }
    });
    // Cut once the get has gone out: the server may have answered it.
    timeout(PATIENCE, async {
        while proxy.sent_while_swallowing() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the get goes out");
    proxy.cut().await;
    let read = timeout(PATIENCE, read).await.unwrap().unwrap();
    assert_eq!(read.unwrap().kv.unwrap().value, "Bob");
    assert_eq!(server.store.revision(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscription_resumes_after_its_connection_is_cut_with_no_change_lost_or_repeated() {
    let server = spawn_server().await;
    let writer = connect(&[server.grpc_url()]).await;
    let proxy = Proxy::start(server.grpc_addr).await;
    let client = connect(&[format!("http://{}", proxy.addr)]).await;
    let mut changes = client
        .subscribe("user:", SubscribeOptions::new())
        .await
        .unwrap();

    writer.set("user:1", "Alice").await.unwrap();
    assert_eq!(next_change(&mut changes).await.0, 1);

    proxy.cut().await;
    // Made while the subscriber is disconnected: they must be replayed, each once.
    writer.set("user:2", "Bob").await.unwrap();
    writer.set("other", "x").await.unwrap();
    writer.set("user:3", "Carol").await.unwrap();

    match next(&mut changes).await {
        Ok(Event::Resuming {
            from_revision,
            reason,
        }) => {
            assert_eq!(from_revision, Some(2));
            assert_ne!(reason.code(), Code::Ok);
        }
        other => panic!("expected the resumption, got {other:?}"),
    }
    assert_eq!(next_change(&mut changes).await.0, 2);
    assert_eq!(next_change(&mut changes).await.0, 4);
    writer.set("user:4", "Dan").await.unwrap();
    assert_eq!(
        next_change(&mut changes).await,
        (5, "user:4".into(), "Dan".into())
    );
    let more = timeout(Duration::from_millis(200), changes.next()).await;
    assert!(more.is_err(), "no change twice: {more:?}");

    drop((changes, proxy));
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscription_resumes_after_a_drain_and_gives_up_when_no_server_answers() {
    let server = spawn_server().await;
    let client = Client::builder([server.grpc_url()])
        .retry(
            RetryPolicy::default()
                .delays(Duration::from_millis(10), Duration::from_millis(50))
                .resume_for(Duration::from_millis(300)),
        )
        .connect()
        .await
        .unwrap();
    let mut changes = client
        .subscribe("user:", SubscribeOptions::new())
        .await
        .unwrap();
    client.set("user:1", "Alice").await.unwrap();
    assert_eq!(next_change(&mut changes).await.0, 1);

    server.shutdown().await;
    // The drain's UNAVAILABLE is a reason to resume, not an error.
    match next(&mut changes).await {
        Ok(Event::Resuming {
            from_revision,
            reason,
        }) => {
            assert_eq!(from_revision, Some(2));
            assert_eq!(reason.code(), Code::Unavailable, "{reason}");
        }
        other => panic!("expected the resumption, got {other:?}"),
    }
    // Nothing listens any more: after its window the subscription gives up, and ends.
    match next(&mut changes).await {
        Err(err @ Error::GaveUp { .. }) => assert_eq!(err.code(), Code::Unavailable),
        other => panic!("expected to give up, got {other:?}"),
    }
    assert!(changes.next().await.is_none());
}

#[tokio::test]
async fn a_lag_is_an_error_unless_asked_to_resume_after_it() {
    let mut settings = test_settings();
    settings.subscriptions.buffer = 1;
    let server = spawn_with(settings).await;
    let client = connect(&[server.grpc_url()]).await;

    let mut plain = client
        .subscribe("key:", SubscribeOptions::new())
        .await
        .unwrap();
    let mut resuming = client
        .subscribe("key:", SubscribeOptions::new().resume_after_lag(true))
        .await
        .unwrap();
    burst(&server, 1..=1);
    assert_eq!(next_change(&mut plain).await.0, 1);
    assert_eq!(next_change(&mut resuming).await.0, 1);
    const WRITES: i64 = 300;
    burst(&server, 2..=WRITES);

    let lagged = loop {
        match next(&mut plain).await {
            Ok(Event::Change(_)) => {}
            Err(err) => break err,
            Ok(other) => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(lagged.code(), Code::ResourceExhausted);
    assert!(
        matches!(
            lagged,
            Error::Lagged {
                last_revision: Some(_),
                ..
            }
        ),
        "{lagged:?}"
    );
    assert!(plain.next().await.is_none(), "a lag ends the stream");

    let mut revisions = vec![1];
    let mut resumed = 0;
    while revisions.len() < WRITES as usize {
        match next(&mut resuming).await {
            Ok(Event::Change(change)) => revisions.push(change.revision),
            Ok(Event::Resuming { reason, .. }) => {
                assert_eq!(reason.code(), Code::ResourceExhausted);
                resumed += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(resumed > 0, "the burst is more than the buffer");
    assert_eq!(
        revisions,
        (1..=WRITES).collect::<Vec<_>>(),
        "every revision exactly once, in order"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_start_revision_no_longer_retained_is_compacted() {
    let mut settings = test_settings();
    settings.history.max_events = 10;
    let server = spawn_with(settings).await;
    burst(&server, 1..=100);
    let client = connect(&[server.grpc_url()]).await;

    let err = client
        .subscribe("key:", SubscribeOptions::new().start_revision(1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let Error::Compacted {
        start_revision,
        oldest_revision: Some(oldest),
        ..
    } = err
    else {
        panic!("expected compacted history, got {err:?}");
    };
    assert_eq!(start_revision, 1);
    // The oldest retained revision can be replayed.
    let mut replay = client
        .subscribe("key:", SubscribeOptions::new().start_revision(oldest))
        .await
        .unwrap();
    assert_eq!(next_change(&mut replay).await.0, oldest);
    drop(replay);
    server.shutdown().await;
}
