//! The `kvstore.KeyValueStore` gRPC service: validates requests at the edge, converts
//! between protobuf and the store's types, and turns a subscription into a response stream
//! that always ends with a status saying why.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status};

use crate::config::Limits;
use crate::pb::change_event::ChangeType;
use crate::pb::key_value_store_server::{KeyValueStore, KeyValueStoreServer};
use crate::pb::{ChangeEvent, GetRequest, GetResponse, SetRequest, SetResponse, SubscribeRequest};
use crate::pubsub::{Change, ChangeKind, Subscription};
use crate::store::Store;

/// Room for protobuf framing on top of the largest key and value.
const MESSAGE_OVERHEAD: usize = 1024;

/// The gRPC face of the [`Store`].
#[derive(Clone)]
pub struct KvService {
    store: Store,
    limits: Limits,
    shutdown: CancellationToken,
}

impl KvService {
    /// A service over `store`, refusing keys and values over `limits`. Cancelling `shutdown`
    /// ends every open Subscribe stream with `UNAVAILABLE`.
    pub fn new(store: Store, limits: Limits, shutdown: CancellationToken) -> Self {
        Self {
            store,
            limits,
            shutdown,
        }
    }

    /// The generated server, with a decode limit that fits the largest valid request, so a
    /// value just over the limit gets `INVALID_ARGUMENT` naming the limit, and a far larger
    /// message gets tonic's `OUT_OF_RANGE` rather than a dropped connection.
    pub fn into_server(self) -> KeyValueStoreServer<Self> {
        let max = self.limits.max_key_bytes + self.limits.max_value_bytes + MESSAGE_OVERHEAD;
        KeyValueStoreServer::new(self).max_decoding_message_size(max)
    }

    fn check_key(&self, key: &str) -> Result<(), Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("key must not be empty"));
        }
        check_size(
            "key",
            key,
            self.limits.max_key_bytes,
            "limits.max_key_bytes",
        )
    }
}

fn check_size(what: &str, s: &str, max: usize, setting: &str) -> Result<(), Status> {
    if s.len() > max {
        return Err(Status::invalid_argument(format!(
            "{what} is {} bytes, over the limit of {max} bytes ({setting})",
            s.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl KeyValueStore for KvService {
    /// A missing key answers `found: false` with an empty value, not an error.
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let key = request.into_inner().key;
        self.check_key(&key)?;
        let response = match self.store.get(&key) {
            Some(value) => GetResponse { value, found: true },
            None => GetResponse::default(),
        };
        Ok(Response::new(response))
    }

    /// Stores the value; nothing is stored when the key or value is refused.
    async fn set(&self, request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let SetRequest { key, value } = request.into_inner();
        self.check_key(&key)?;
        check_size(
            "value",
            &value,
            self.limits.max_value_bytes,
            "limits.max_value_bytes",
        )?;
        self.store.set(key, value);
        Ok(Response::new(SetResponse {
            success: true,
            message: "stored".into(),
        }))
    }

    type SubscribeStream = ChangeStream;

    /// Prefix match; an empty `key_pattern` matches every key. The subscription is
    /// registered before this returns, so the client sees every write made after it has the
    /// response headers.
    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let prefix = request.into_inner().key_pattern;
        check_size(
            "key_pattern",
            &prefix,
            self.limits.max_key_bytes,
            "limits.max_key_bytes",
        )?;
        let subscription = self
            .store
            .subscribe(prefix)
            .map_err(|err| Status::resource_exhausted(err.to_string()))?;
        Ok(Response::new(ChangeStream {
            subscription,
            shutdown: Box::pin(self.shutdown.clone().cancelled_owned()),
            ended: false,
        }))
    }
}

/// The response stream of one Subscribe: the subscription's changes until the client goes
/// away (dropping it unsubscribes), the subscriber lags (`RESOURCE_EXHAUSTED`) or the server
/// shuts down (`UNAVAILABLE`).
pub struct ChangeStream {
    subscription: Subscription,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    ended: bool,
}

impl Stream for ChangeStream {
    type Item = Result<ChangeEvent, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.shutdown.as_mut().poll(cx).is_ready() {
            this.ended = true;
            return Poll::Ready(Some(Err(Status::unavailable(
                "server is shutting down; reconnect to another instance",
            ))));
        }
        match Pin::new(&mut this.subscription).poll_next(cx) {
            Poll::Ready(Some(Ok(change))) => Poll::Ready(Some(Ok(to_event(&change)))),
            Poll::Ready(Some(Err(lagged))) => {
                this.ended = true;
                Poll::Ready(Some(Err(Status::resource_exhausted(lagged.to_string()))))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn to_event(change: &Arc<Change>) -> ChangeEvent {
    let change_type = match change.kind {
        ChangeKind::Set => ChangeType::Set,
        ChangeKind::Delete => ChangeType::Delete,
    };
    ChangeEvent {
        change_type: change_type.into(),
        key: change.key.clone(),
        value: change.value.clone(),
        timestamp: change.timestamp_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn service() -> KvService {
        let limits = Limits {
            max_key_bytes: 8,
            max_value_bytes: 16,
        };
        KvService::new(Store::new(4, 2), limits, CancellationToken::new())
    }

    fn set(key: &str, value: &str) -> Request<SetRequest> {
        Request::new(SetRequest {
            key: key.into(),
            value: value.into(),
        })
    }

    #[tokio::test]
    async fn bad_keys_and_values_are_refused_and_nothing_is_stored() {
        let svc = service();
        for (key, value, says) in [
            ("", "v", "key must not be empty"),
            ("123456789", "v", "limits.max_key_bytes"),
            ("k", "12345678901234567", "limits.max_value_bytes"),
        ] {
            let status = svc.set(set(key, value)).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains(says), "{}", status.message());
        }
        assert!(svc.store.is_empty());
        let get = Request::new(GetRequest { key: String::new() });
        assert_eq!(
            svc.get(get).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn values_at_the_limits_are_accepted() {
        let svc = service();
        svc.set(set("12345678", "1234567890123456")).await.unwrap();
        svc.set(set("e", "")).await.unwrap();
        let got = svc
            .get(Request::new(GetRequest { key: "e".into() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            got,
            GetResponse {
                value: String::new(),
                found: true
            }
        );
    }
}
