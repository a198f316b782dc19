//! gRPC channels to a Tollgate, over TCP or a Unix domain socket.

use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Uri};

/// Connects to `target`: `http://HOST:PORT`, or `unix:/PATH` for a Unix
/// domain socket (as grpcio and grpc-go spell it).
pub async fn connect(target: &str) -> Result<Channel, tonic::transport::Error> {
    connect_with(target, None).await
}

/// Like [`connect`], over TLS with `tls` (for `https://HOST:PORT`).
pub async fn connect_with(target: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, tonic::transport::Error> {
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
            let mut endpoint = Endpoint::from_shared(target.to_owned())?.tcp_nodelay(true);
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls)?;
            }
            endpoint.connect().await
        }
    }
}

/// Adds `authorization: Bearer TOKEN` to every call (the admin API's
/// credential); without a token, nothing.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// Presents `token`.
    pub fn new(token: &str) -> Result<Bearer, tonic::metadata::errors::InvalidMetadataValue> {
        let mut value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(..)" } else { "Bearer(none)" })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An admin API client presenting its credential on every call.
pub type AdminClient =
    crate::proto::admin_client::AdminClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// An admin API client on `channel` presenting `bearer`.
pub fn admin_client(channel: Channel, bearer: Bearer) -> AdminClient {
    crate::proto::admin_client::AdminClient::with_interceptor(channel, bearer)
}
