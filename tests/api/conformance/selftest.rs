//! The checker against hand-made recordings: a clean one passes, and each planted defect is
//! reported, so the suite cannot pass vacuously. No server.

use std::time::Duration;

use super::checker::check;
use super::record::{
    Answer, Call, End, Entry, Event, Item, Kind, Op, OpAnswer, Page, Request, Rev, Run, Start,
    Stream,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn change(revision: Rev, kind: Kind, key: &str, value: &str, create: Rev, version: u64) -> Event {
    Event {
        revision,
        kind,
        key: key.into(),
        value: value.into(),
        initial: false,
        create_revision: create,
        version,
    }
}

fn entry(value: &str, create: Rev, modified: Rev, version: u64) -> Entry {
    Entry {
        value: value.into(),
        create_revision: create,
        mod_revision: modified,
        version,
    }
}

fn at(start: u64, end: u64, request: Request, answer: Answer) -> Call {
    Call {
        client: 0,
        start: ms(start),
        end: ms(end),
        request,
        answer,
    }
}

fn set(key: &str, value: &str, guard: Option<Rev>, ttl_ms: u64) -> Op {
    Op::Set {
        key: key.into(),
        value: value.into(),
        guard,
        ttl_ms,
    }
}

fn get(key: &str) -> Op {
    Op::Get { key: key.into() }
}

fn found(value: Option<Entry>, ttl_ms: u64, revision: Rev) -> OpAnswer {
    OpAnswer::Get {
        found: value,
        ttl_ms,
        revision,
    }
}

fn one(op: Op, answer: OpAnswer) -> (Request, Answer) {
    (Request::One(op), Answer::One(answer))
}

fn call((start, end): (u64, u64), (request, answer): (Request, Answer)) -> Call {
    at(start, end, request, answer)
}

/// Seven revisions: two CASes on `a/0` (one stale, on `a/1`), a TTL key read while it
/// lives and after it expired, a Batch that reads and writes, a List, a resumed stream and
/// a snapshot.
fn clean() -> Run {
    let history = vec![
        change(1, Kind::Set, "a/0", "v1", 1, 1),
        change(2, Kind::Set, "a/1", "w1", 2, 1),
        change(3, Kind::Set, "a/0", "v2", 1, 2),
        change(4, Kind::Set, "b/0", "t", 4, 1),
        change(5, Kind::Set, "a/1", "w2", 2, 2),
        change(6, Kind::Delete, "a/0", "", 0, 0),
        change(7, Kind::Expire, "b/0", "", 0, 0),
    ];
    let batch = vec![
        get("a/1"),
        set("a/1", "w2", Some(2), 0),
        get("a/1"),
        Op::Delete {
            key: "a/0".into(),
            guard: None,
        },
    ];
    let results = vec![
        found(Some(entry("w1", 2, 2, 1)), 0, 4),
        OpAnswer::Set { revision: 5 },
        found(Some(entry("w2", 2, 5, 2)), 0, 5),
        OpAnswer::Delete {
            prev_mod_revision: Some(3),
            revision: 6,
        },
    ];
    let page = Page {
        items: vec![
            Item {
                key: "a/1".into(),
                entry: entry("w2", 2, 5, 2),
                ttl_ms: Some(0),
            },
            Item {
                key: "b/0".into(),
                entry: entry("t", 4, 4, 1),
                ttl_ms: Some(4),
            },
        ],
        more: false,
        next_start_after: String::new(),
        revision: 6,
    };
    let calls = vec![
        call(
            (0, 1),
            one(set("a/0", "v1", None, 0), OpAnswer::Set { revision: 1 }),
        ),
        call(
            (2, 3),
            one(set("a/1", "w1", None, 0), OpAnswer::Set { revision: 2 }),
        ),
        call(
            (4, 5),
            one(set("a/0", "v2", Some(1), 0), OpAnswer::Set { revision: 3 }),
        ),
        call(
            (4, 5),
            one(
                set("a/1", "x", Some(1), 0),
                OpAnswer::Conflict { mod_revision: 2 },
            ),
        ),
        call(
            (6, 7),
            one(get("a/0"), found(Some(entry("v2", 1, 3, 2)), 0, 3)),
        ),
        call(
            (8, 9),
            one(set("b/0", "t", None, 10), OpAnswer::Set { revision: 4 }),
        ),
        call(
            (10, 11),
            one(get("b/0"), found(Some(entry("t", 4, 4, 1)), 8, 4)),
        ),
        at(
            12,
            13,
            Request::Batch(batch),
            Answer::Batch {
                results,
                revision: 6,
            },
        ),
        at(
            14,
            15,
            Request::List {
                prefix: String::new(),
                start_after: String::new(),
                limit: 2,
            },
            Answer::List(page),
        ),
        call((40, 41), one(get("b/0"), found(None, 0, 7))),
    ];
    let resumed = Stream {
        name: "a/ from 2".into(),
        prefix: "a/".into(),
        start: Start::Revision(2),
        events: [1, 2, 4, 5].iter().map(|&i| history[i].clone()).collect(),
        end: End::Reached(6),
    };
    let initial = |e: &Event| Event {
        initial: true,
        ..e.clone()
    };
    let snapshot = Stream {
        name: "snapshot".into(),
        prefix: String::new(),
        start: Start::Snapshot {
            start: ms(16),
            end: ms(17),
        },
        events: vec![
            initial(&history[4]),
            initial(&history[3]),
            change(6, Kind::Progress, "", "", 0, 0),
            history[6].clone(),
        ],
        end: End::Reached(7),
    };
    Run {
        calls,
        history,
        streams: vec![resumed, snapshot],
        resumes: Vec::new(),
    }
}

/// Checks `run` and asserts its first violation mentions `what`.
fn assert_caught(run: &Run, what: &str) {
    let report = check(run);
    let first = report
        .violations
        .first()
        .expect("the planted defect is reported");
    assert!(
        first.contains(what),
        "expected {what:?}, got {:#?}",
        report.violations
    );
}

#[test]
fn the_checker_passes_a_clean_recording() {
    let report = check(&clean());
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert!(report.checks > 50, "{}", report.checks);
}

#[test]
fn the_checker_catches_a_stale_read() {
    let mut run = clean();
    run.calls[4].answer = Answer::One(found(Some(entry("v1", 1, 1, 1)), 0, 3));
    assert_caught(&run, "a/0 at revision 3: got");
}

#[test]
fn the_checker_catches_a_duplicate_revision() {
    let mut run = clean();
    run.history[4].revision = 4;
    assert_caught(&run, "revisions dense and unique");
}

#[test]
fn the_checker_catches_two_cases_on_one_guard_both_succeeding() {
    let mut run = clean();
    // After the Batch a/1 is at 5: two writers guard on 5, and both succeed.
    run.calls.push(call(
        (50, 51),
        one(set("a/1", "x", Some(5), 0), OpAnswer::Set { revision: 8 }),
    ));
    run.calls.push(call(
        (50, 51),
        one(set("a/1", "y", Some(5), 0), OpAnswer::Set { revision: 9 }),
    ));
    run.history.push(change(8, Kind::Set, "a/1", "x", 2, 3));
    run.history.push(change(9, Kind::Set, "a/1", "y", 2, 4));
    assert_caught(&run, "Conflict { mod_revision: 8 }");
}

#[test]
fn the_checker_catches_a_stream_gap() {
    let mut run = clean();
    run.streams[0].events.remove(1);
    assert_caught(&run, "a gap, a duplicate or a wrong event");
}

#[test]
fn the_checker_catches_a_partly_applied_batch() {
    let mut run = clean();
    // A reader between the Batch's set (5) and its delete (6).
    run.calls.push(call(
        (12, 13),
        one(get("a/0"), found(Some(entry("v2", 1, 3, 2)), 0, 5)),
    ));
    assert_caught(&run, "inside a Batch");
}

#[test]
fn the_checker_catches_a_batch_get_reporting_the_batchs_last_revision() {
    let mut run = clean();
    let Answer::Batch { results, .. } = &mut run.calls[7].answer else {
        unreachable!()
    };
    results[0] = found(Some(entry("w1", 2, 2, 1)), 0, 6);
    // It read w1, which a/1 no longer was at 6.
    assert_caught(&run, "a/1 at revision 6: got");
}

#[test]
fn the_checker_catches_a_key_read_after_its_deadline() {
    let mut run = clean();
    // b/0 was set by 9 ms with a TTL of 10 ms: at 30 ms it is past its deadline.
    run.calls.push(call(
        (30, 31),
        one(get("b/0"), found(Some(entry("t", 4, 4, 1)), 1, 6)),
    ));
    assert_caught(&run, "after its deadline");
}

#[test]
fn the_checker_catches_a_snapshot_not_at_its_revision() {
    let mut run = clean();
    // The snapshot (a/0 deleted, a/1 at 5) claims revision 5, where a/0 still lived.
    run.streams[1].events[2].revision = 5;
    assert_caught(&run, "skipped live key a/0");
}
