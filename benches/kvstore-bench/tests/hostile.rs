//! The load tool's hostile kinds against a real server in this process (the library's
//! `bind`/`run`, on 127.0.0.1:0): that each does what its figures claim it does.

mod common;

use std::time::Duration;

/// How long the tool and the server's drain may take before the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(120);

/// big-answers asks for answers of hundreds of megabytes: with the server's default
/// limits.max_response_bytes (4 MiB), every Batch is refused naming that limit and every
/// List gets a short page of the 1 MiB values, which the attacker reads.
#[tokio::test]
async fn big_answers_get_refused_batches_and_short_pages() {
    let server = common::spawn_server().await;
    let addr = server.addr;

    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvstore-bench"))
        .args(["--json", "hostile", "--server", &addr.to_string()])
        .args(["--hostile", "big-answers", "--big-answers-connections", "2"])
        .args(["--duration", "2s", "--repeat", "1", "--connections", "1"])
        .args(["--concurrency", "1", "--keys", "100", "--preload"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, run).await.unwrap().unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let with = report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|round| round["hostile"] == true)
        .unwrap_or_else(|| panic!("no round with the attackers: {report}"));
    let counts = with["outcome"]["counts"].as_object().unwrap();
    // 1 MiB values and 64 bytes of framing each: three fit in 4 MiB, a fourth does not.
    let expected = [
        "Batch refused: ResourceExhausted (limits.max_response_bytes)",
        "List page: 3 items, more",
    ];
    for name in expected {
        assert!(counts[name].as_u64().unwrap_or(0) > 0, "{name}: {with}");
    }
    assert_eq!(counts.len(), expected.len(), "only those: {with}");

    server.shutdown(PATIENCE).await;
}
