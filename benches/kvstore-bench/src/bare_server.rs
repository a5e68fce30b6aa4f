//! `bare-server`: kvstore.KeyValueStore answering constants with nothing behind it, the
//! ceiling of any store built on this gRPC stack.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use futures_core::stream::BoxStream;
use kvstore::grpc::batch::{BatchReply, EncodedBatch};
use kvstore::pb::key_value_store_server::{KeyValueStore, KeyValueStoreServer};
use kvstore::pb::{
    ChangeEvent, DeleteRequest, DeleteResponse, GetRequest, GetResponse, ListRequest, ListResponse,
    SetRequest, SetResponse, SubscribeRequest,
};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

#[derive(Debug, Args)]
pub struct BareServerArgs {
    /// Address to listen on; port 0 picks a free port, printed on stdout.
    #[arg(long)]
    pub listen: SocketAddr,

    /// Bytes of the constant value that every Get answers, to match the real server's reply.
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
}

/// The bench fixture: `kvstore.KeyValueStore` with no store, middleware or tracing behind it,
/// answering Get and Set with constants the size of the real server's replies.
pub struct Bare {
    pub get: GetResponse,
    pub set: SetResponse,
}

#[tonic::async_trait]
impl KeyValueStore for Bare {
    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Ok(Response::new(self.get.clone()))
    }

    async fn set(&self, _: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        Ok(Response::new(self.set.clone()))
    }

    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Err(Status::unimplemented("the bare server answers Get and Set"))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("the bare server answers Get and Set"))
    }

    async fn batch(&self, _: Request<EncodedBatch>) -> Result<Response<BatchReply>, Status> {
        Err(Status::unimplemented("the bare server answers Get and Set"))
    }

    type SubscribeStream = BoxStream<'static, Result<ChangeEvent, Status>>;

    async fn subscribe(
        &self,
        _: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("the bare server answers Get and Set"))
    }
}

pub async fn bare_server(args: BareServerArgs) -> anyhow::Result<()> {
    let bare = Bare {
        get: GetResponse {
            value: "x".repeat(args.value_size),
            found: true,
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            ttl_ms: 0,
            revision: 1,
        },
        set: SetResponse {
            success: true,
            message: "stored at revision 1".into(),
            revision: 1,
        },
    };
    // `Server::tcp_nodelay` applies only when tonic binds the address itself; binding here
    // lets port 0 work and the address be printed, so nodelay is set on the listener instead.
    let incoming = TcpIncoming::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?
        .with_nodelay(Some(true));
    let addr = incoming.local_addr().context("reading the bound address")?;
    println!("bare-server listening on {addr}");
    Server::builder()
        .add_service(KeyValueStoreServer::new(bare))
        .serve_with_incoming_shutdown(incoming, kvstore::shutdown::signal())
        .await
        .context("serving")
}
