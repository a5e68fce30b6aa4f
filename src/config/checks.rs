//! The range checks: each value on its own, and against the others.

use super::load::invalid;
use super::*;

/// The range checks: each value on its own, and against the others.
pub(super) fn validate(settings: &Settings, figment: &Figment) -> Result<(), ConfigError> {
    let at_least_one = [
        ("server.max_in_flight", settings.server.max_in_flight),
        ("server.max_connections", settings.server.max_connections),
        (
            "server.max_streams_per_connection",
            settings.server.max_streams_per_connection as usize,
        ),
        ("limits.max_key_bytes", settings.limits.max_key_bytes),
        ("limits.max_page", settings.limits.max_page),
        ("limits.max_batch_ops", settings.limits.max_batch_ops),
        ("subscriptions.buffer", settings.subscriptions.buffer),
        ("subscriptions.max", settings.subscriptions.max),
        (
            "server.max_health_watches",
            settings.server.max_health_watches,
        ),
    ];
    for (key, value) in at_least_one {
        if value == 0 {
            return Err(invalid(figment, key, "must be at least 1, got 0"));
        }
    }
    if settings.server.max_connections_per_address > settings.server.max_connections {
        return Err(invalid(
            figment,
            "server.max_connections_per_address",
            &format!(
                "must be at most server.max_connections ({}), got {}; 0 means a tenth of it",
                settings.server.max_connections, settings.server.max_connections_per_address
            ),
        ));
    }
    if settings.subscriptions.max_per_client > settings.subscriptions.max {
        return Err(invalid(
            figment,
            "subscriptions.max_per_client",
            &format!(
                "must be at most subscriptions.max ({}), got {}; 0 means a tenth of it",
                settings.subscriptions.max, settings.subscriptions.max_per_client
            ),
        ));
    }
    if settings.limits.max_key_bytes > crate::record::MAX_KEY_BYTES {
        return Err(invalid(
            figment,
            "limits.max_key_bytes",
            &format!(
                "must be at most {} (64 KiB), got {}",
                crate::record::MAX_KEY_BYTES,
                settings.limits.max_key_bytes
            ),
        ));
    }
    let one_item = settings.limits.max_key_bytes
        + settings.limits.max_value_bytes
        + crate::record::ANSWER_OVERHEAD;
    if settings.limits.max_response_bytes < one_item {
        return Err(invalid(
            figment,
            "limits.max_response_bytes",
            &format!(
                "must hold one key and value at their limits (limits.max_key_bytes + \
                 limits.max_value_bytes + {} bytes of framing = {one_item}), got {}",
                crate::record::ANSWER_OVERHEAD,
                settings.limits.max_response_bytes
            ),
        ));
    }
    if settings.server.max_control_frames < MIN_CONTROL_FRAMES {
        return Err(invalid(
            figment,
            "server.max_control_frames",
            &format!(
                "must be at least {MIN_CONTROL_FRAMES}, so that a client's opening frames fit, got {}",
                settings.server.max_control_frames
            ),
        ));
    }
    if settings.server.max_header_bytes < MIN_HEADER_BYTES {
        return Err(invalid(
            figment,
            "server.max_header_bytes",
            &format!(
                "must be at least {MIN_HEADER_BYTES} (HTTP/1.1's smallest read buffer), got {}",
                settings.server.max_header_bytes
            ),
        ));
    }
    if u32::try_from(settings.server.max_header_bytes).is_err() {
        return Err(invalid(
            figment,
            "server.max_header_bytes",
            &format!(
                "must be at most {} (HTTP/2's limit), got {}",
                u32::MAX,
                settings.server.max_header_bytes
            ),
        ));
    }
    if settings.server.max_answer_bytes_in_flight < settings.server.max_answer_bytes_per_connection
    {
        return Err(invalid(
            figment,
            "server.max_answer_bytes_in_flight",
            &format!(
                "must be at least server.max_answer_bytes_per_connection ({}), got {}",
                settings.server.max_answer_bytes_per_connection,
                settings.server.max_answer_bytes_in_flight
            ),
        ));
    }
    let positive = [
        ("server.send_timeout", settings.server.send_timeout),
        (
            "server.request_body_timeout",
            settings.server.request_body_timeout,
        ),
        (
            "server.handshake_timeout",
            settings.server.handshake_timeout,
        ),
        (
            "server.keepalive_timeout",
            settings.server.keepalive_timeout,
        ),
    ];
    for (key, value) in positive {
        if value.is_zero() {
            return Err(invalid(figment, key, "must be longer than 0s"));
        }
    }
    if settings.server.health_listen == Some(settings.server.listen)
        && settings.server.listen.port() != 0
    {
        return Err(invalid(
            figment,
            "server.health_listen",
            &format!(
                "must differ from server.listen ({}); set it to \"\" to serve everything on one port",
                settings.server.listen
            ),
        ));
    }
    Ok(())
}
