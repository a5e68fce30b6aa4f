//! The load tool against a real server in this process (the library's `bind`/`run`, on
//! 127.0.0.1:0): what its figures rest on, not the figures themselves.

mod common;

use std::time::Duration;

use kvstore::pb::GetRequest;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;

/// How long the tool and the server's drain may take before the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(60);

/// The load tool's batch mode checks each response by counting its results by kind instead
/// of decoding them (`kvstore::grpc::batch::ResultCounts`): against the real server, every
/// call of a run must come back whole and counted as it was sent.
#[tokio::test]
async fn the_load_tools_batches_come_back_counted_as_sent() {
    let server = common::spawn_server().await;
    let addr = server.addr;

    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvstore-bench"))
        .args(["batch", "--server", &addr.to_string()])
        .args(["--requests", "40", "--batch-size", "100", "--keys", "1000"])
        .args([
            "--connections",
            "2",
            "--concurrency",
            "2",
            "--preload",
            "--json",
        ])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, run).await.unwrap().unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["calls"], 40, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    // --preload set every key of the space before the run.
    let mut client = KeyValueStoreClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let reply = client
        .get(GetRequest {
            key: "key:000000000999".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.found);

    drop(client);
    server.shutdown(PATIENCE).await;
}
