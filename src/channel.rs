//! gRPC channels to a Tollgate, over TCP or a Unix domain socket.

use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to `target`: `http://HOST:PORT`, or `unix:/PATH` for a Unix
/// domain socket (as grpcio and grpc-go spell it).
pub async fn connect(target: &str) -> Result<Channel, tonic::transport::Error> {
    match target.strip_prefix("unix:") {
        Some(path) => {
            let path = path.trim_start_matches("//").to_owned();
            // The URI is required by the API and unused by the connector.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
        }
        None => {
            Endpoint::from_shared(target.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await
        }
    }
}
