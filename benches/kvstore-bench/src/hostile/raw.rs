//! Hostile kinds written as raw HTTP/2 frames on TCP, the cheapest attacker there is: floods
//! of control frames that do no work, and connections from one address that send one
//! request and then dribble a byte a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ControlFrame;
use super::attack::{Counts, Plan, connect_from};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// After a failed connect, how long a slot waits before the next: past the server's
/// connection limits, or out of ports, it must not spin.
const CONNECT_PAUSE: Duration = Duration::from_millis(100);

/// How often a one-source connection sends its next byte.
const DRIBBLE_EVERY: Duration = Duration::from_secs(1);

/// The debug data of the GOAWAY that cuts a control-frame flood names this key.
const CONTROL_FRAMES_KEY: &[u8] = b"server.max_control_frames";

/// An HTTP/2 frame written by hand: its 9-byte header, then `payload`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frames here are small");
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The preface and an empty SETTINGS frame: a valid start of a connection.
fn opening() -> Vec<u8> {
    let mut opening = PREFACE.to_vec();
    opening.extend(frame(SETTINGS, 0, 0, &[]));
    opening
}

/// control-flood: each connection sends its frame in batches as fast as the socket takes
/// them, reads and discards what comes back, and is reopened when the server closes it.
pub fn control_flood(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) {
    let one = match plan.args.control_frame {
        ControlFrame::WindowUpdate => frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()),
        // 2,730 six-byte parameters: the most a 16 KiB frame holds (SETTINGS_ENABLE_PUSH 0).
        ControlFrame::Settings => frame(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0].repeat(2730)),
        ControlFrame::Ping => frame(PING, 0, 0, &[7; 8]),
    };
    let batch: Arc<[u8]> = one.repeat((16 * 1024 / one.len()).max(1)).into();
    for _ in 0..plan.args.control_flood_connections {
        let (plan, batch, counts, stop) =
            (plan.clone(), batch.clone(), counts.clone(), stop.clone());
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                let tcp = match connect_from(plan.server, plan.args.hostile_source).await {
                    Ok(tcp) => tcp,
                    Err(_) => {
                        counts.add("connects failed");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(CONNECT_PAUSE) => continue,
                        }
                    }
                };
                counts.add("connections");
                let (mut read, mut write) = tcp.into_split();
                let discard = async {
                    let mut buffer = vec![0u8; 64 * 1024];
                    let mut cut = false;
                    while let Ok(n @ 1..) = read.read(&mut buffer).await {
                        cut |= buffer[..n]
                            .windows(CONTROL_FRAMES_KEY.len())
                            .any(|w| w == CONTROL_FRAMES_KEY);
                    }
                    cut
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = write_forever(&mut write, &batch) => counts.add("closed while writing"),
                    cut = discard => counts.add(if cut {
                        "closed with a GOAWAY naming server.max_control_frames"
                    } else {
                        "closed"
                    }),
                }
            }
        });
    }
}

/// Writes the opening, then `batch` again and again, until the socket fails.
async fn write_forever(write: &mut OwnedWriteHalf, batch: &[u8]) -> std::io::Error {
    if let Err(err) = write.write_all(&opening()).await {
        return err;
    }
    loop {
        if let Err(err) = write.write_all(batch).await {
            return err;
        }
    }
}

/// Writes `start`, then `next` a byte every [`DRIBBLE_EVERY`], then holds the connection
/// as it is; returns only when the socket fails.
async fn dribble(write: &mut OwnedWriteHalf, start: &[u8], next: &[u8]) -> std::io::Result<()> {
    write.write_all(start).await?;
    for byte in next {
        tokio::time::sleep(DRIBBLE_EVERY).await;
        write.write_all(&[*byte]).await?;
    }
    std::future::pending().await
}

/// The HEADERS of a Get on `stream`, HPACK-encoded by hand (static-table names, literal
/// values, not indexed, no Huffman), then its DATA: an empty GetRequest, ending the stream.
fn get_request(stream: u32) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    for (index, value) in [(4u8, "/kvstore.KeyValueStore/Get"), (1, "kvstore")] {
        // :path, :authority: a literal value under an indexed name.
        block.push(index);
        block.push(u8::try_from(value.len()).expect("short"));
        block.extend_from_slice(value.as_bytes());
    }
    // content-type (static index 31, past the 4-bit prefix), then te as a new name.
    block.extend([0x0f, 31 - 15, 16]);
    block.extend_from_slice(b"application/grpc");
    block.extend([0x00, 2]);
    block.extend_from_slice(b"te");
    block.push(8);
    block.extend_from_slice(b"trailers");
    let mut request = frame(HEADERS, END_HEADERS, stream, &block);
    request.extend(frame(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0]));
    request
}

/// one-source: connections from the one hostile address, each sending one complete Get
/// and then the header of a next frame a byte a second; each, once the server closes it,
/// is counted with the time it lived and opened anew.
pub fn one_source(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) {
    let mut start = opening();
    start.extend(get_request(1));
    let start: Arc<[u8]> = start.into();
    let next = frame(HEADERS, END_HEADERS, 3, &[0x83]);
    for _ in 0..plan.args.one_source {
        let (plan, start, next, counts, stop) = (
            plan.clone(),
            start.clone(),
            next.clone(),
            counts.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                let opened = Instant::now();
                let tcp = match connect_from(plan.server, plan.args.hostile_source).await {
                    Ok(tcp) => tcp,
                    Err(_) => {
                        counts.add("connects failed");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(CONNECT_PAUSE) => continue,
                        }
                    }
                };
                counts.add("connections");
                let (mut read, mut write) = tcp.into_split();
                let read_to_end = async {
                    let mut buffer = vec![0u8; 16 * 1024];
                    while let Ok(1..) = read.read(&mut buffer).await {}
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = dribble(&mut write, &start, &next) => {}
                    () = read_to_end => {}
                }
                let lived = opened.elapsed();
                counts.add(format!(
                    "closed after {}",
                    match lived.as_secs() {
                        0 => "< 1 s",
                        1..10 => "1-10 s",
                        10..60 => "10-60 s",
                        _ => "> 60 s",
                    }
                ));
            }
        });
    }
}
