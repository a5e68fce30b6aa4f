//! The budget of HTTP/2 frames that do no work (`server.max_control_frames`): WINDOW_UPDATE,
//! SETTINGS, PING, PRIORITY, RST_STREAM, GOAWAY, unknown types, and DATA or HEADERS that are
//! empty and do not end their stream. Useful frames in either direction earn more, as Envoy
//! allows WINDOW_UPDATEs per DATA frame sent; [`partial`](super::partial) feeds it the frame
//! headers and closes the connection when it is spent.

use tokio::time::{Duration, Instant};

/// What one frame of work (a request's HEADERS or DATA, an answer's HEADERS or DATA, a PING
/// or SETTINGS of the server's own) earns: an honest peer answers each with at most a
/// WINDOW_UPDATE for the stream and one for the connection, and grpc-go a BDP PING as well.
const WORK_CREDIT: u32 = 4;

/// How often a connection earns one control frame however idle it is, so that a client's
/// keep-alive PINGs never run a long-lived quiet connection (a Subscribe with no events)
/// out of budget.
const REFILL_EVERY: Duration = Duration::from_millis(100);

/// One HTTP/2 frame header (RFC 9113 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameHeader {
    pub(super) len: u32,
    pub(super) kind: u8,
    pub(super) flags: u8,
    pub(super) stream: u32,
}

impl FrameHeader {
    pub(super) fn parse(bytes: &[u8; 9]) -> Self {
        Self {
            len: u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]),
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
/// END_STREAM on DATA and HEADERS; ACK on SETTINGS and PING.
const END_STREAM_OR_ACK: u8 = 0x1;
/// The bytes of one SETTINGS parameter: a SETTINGS frame costs one frame per parameter.
const SETTING_BYTES: u32 = 6;
/// The GOAWAY error code ENHANCE_YOUR_CALM (RFC 9113 §7).
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Control frames one connection may still send, refilled by work and by time.
pub(super) struct ControlBudget {
    left: u32,
    max: u32,
    /// Up to when time has been credited.
    refilled: Instant,
    /// The highest stream the client opened, for the GOAWAY.
    last_stream: u32,
}

impl ControlBudget {
    pub(super) fn new(max: u32) -> Self {
        Self {
            left: max,
            max,
            refilled: Instant::now(),
            last_stream: 0,
        }
    }

    /// Charges a frame the client sent; false once the budget is spent.
    pub(super) fn received(&mut self, frame: FrameHeader) -> bool {
        let working = frame.len > 0 || frame.flags & END_STREAM_OR_ACK != 0;
        let cost = match frame.kind {
            HEADERS if working => {
                self.last_stream = self.last_stream.max(frame.stream);
                self.earn();
                return true;
            }
            DATA if working => {
                self.earn();
                return true;
            }
            // Part of a header block, which h2 bounds (max_header_list_size and its
            // CONTINUATION limit).
            CONTINUATION => return true,
            // Each parameter is processed on its own: 2,730 fit in one 16 KiB frame.
            SETTINGS => (frame.len / SETTING_BYTES).max(1),
            _ => 1,
        };
        self.spend(cost)
    }

    /// Credits a frame the server wrote. Only frames the client has reason to answer earn:
    /// not the server's ACKs, resets or WINDOW_UPDATEs, which the client can provoke.
    pub(super) fn sent(&mut self, frame: FrameHeader) {
        let earns = match frame.kind {
            DATA | HEADERS => true,
            PING | SETTINGS => frame.flags & END_STREAM_OR_ACK == 0,
            _ => false,
        };
        if earns {
            self.earn();
        }
    }

    fn earn(&mut self) {
        self.left = self.left.saturating_add(WORK_CREDIT).min(self.max);
    }

    fn spend(&mut self, cost: u32) -> bool {
        if let Some(left) = self.left.checked_sub(cost) {
            self.left = left;
            return true;
        }
        // The clock is read only here, when the budget runs short: never on an honest
        // connection's usual path.
        let now = Instant::now();
        let ticks = (now - self.refilled).as_nanos() / REFILL_EVERY.as_nanos();
        let ticks = u32::try_from(ticks).unwrap_or(u32::MAX);
        self.refilled = if ticks >= self.max {
            now
        } else {
            self.refilled + REFILL_EVERY * ticks
        };
        self.left = self.left.saturating_add(ticks).min(self.max);
        match self.left.checked_sub(cost) {
            Some(left) => {
                self.left = left;
                true
            }
            None => false,
        }
    }

    /// The GOAWAY that closes a connection past its budget: ENHANCE_YOUR_CALM, naming the
    /// setting in its debug data.
    pub(super) fn goaway(&self) -> Vec<u8> {
        const DEBUG: &[u8] = b"server.max_control_frames: too many frames that do no work";
        let len = u32::try_from(8 + DEBUG.len()).expect("a short message");
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend([GOAWAY, 0, 0, 0, 0, 0]);
        frame.extend(self.last_stream.to_be_bytes());
        frame.extend(ENHANCE_YOUR_CALM.to_be_bytes());
        frame.extend_from_slice(DEBUG);
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, len: u32, stream: u32) -> FrameHeader {
        FrameHeader {
            len,
            kind,
            flags,
            stream,
        }
    }

    const WINDOW_UPDATE: u8 = 0x8;

    // Paused: time refills the budget, and these tests must not depend on how fast they run.
    #[tokio::test(start_paused = true)]
    async fn control_frames_are_allowed_up_to_the_budget() {
        let mut budget = ControlBudget::new(100);
        let update = frame(WINDOW_UPDATE, 0, 4, 0);
        assert!((0..100).all(|_| budget.received(update)));
        assert!(!budget.received(update));
    }

    #[tokio::test(start_paused = true)]
    async fn a_settings_frame_costs_one_frame_per_parameter() {
        let mut budget = ControlBudget::new(100);
        assert!(budget.received(frame(SETTINGS, 0, 6 * 60, 0)));
        assert!(!budget.received(frame(SETTINGS, 0, 6 * 41, 0)));
        assert!(budget.received(frame(SETTINGS, END_STREAM_OR_ACK, 0, 0)));
    }

    #[tokio::test(start_paused = true)]
    async fn work_in_either_direction_earns_more_but_empty_frames_do_not() {
        let mut budget = ControlBudget::new(100);
        let update = frame(WINDOW_UPDATE, 0, 4, 0);
        assert!((0..100).all(|_| budget.received(update)));
        budget.sent(frame(DATA, 0, 100, 1));
        budget.sent(frame(PING, END_STREAM_OR_ACK, 8, 0));
        assert!(budget.received(frame(HEADERS, 0, 30, 3)));
        assert!(budget.received(frame(DATA, END_STREAM_OR_ACK, 0, 3)));
        assert!((0..3 * WORK_CREDIT).all(|_| budget.received(update)));
        assert!(!budget.received(frame(DATA, 0, 0, 3)));
        assert!(!budget.received(frame(HEADERS, 0, 0, 3)));
        assert_eq!(&budget.goaway()[13..17], &[0, 0, 0, 0xb]);
        assert_eq!(&budget.goaway()[9..13], &[0, 0, 0, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn time_refills_the_budget_slowly() {
        let mut budget = ControlBudget::new(100);
        let ping = frame(PING, 0, 8, 0);
        assert!((0..100).all(|_| budget.received(ping)));
        tokio::time::advance(REFILL_EVERY * 5 + REFILL_EVERY / 2).await;
        assert!((0..5).all(|_| budget.received(ping)));
        assert!(!budget.received(ping));
        tokio::time::advance(REFILL_EVERY / 2).await;
        assert!(budget.received(ping));
    }
}
