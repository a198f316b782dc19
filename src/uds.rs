//! Unix-socket connections whose clients name the socket as `:authority`.
//!
//! grpcio (Python, C++) and grpc-java send a Unix socket's path (or its
//! percent-encoding) as the HTTP/2 `:authority`, which is not a valid
//! authority; the HTTP/2 server under tonic (h2) then resets every stream
//! with `PROTOCOL_ERROR`. Every connection accepted on Tollgate's Unix
//! sockets is therefore relayed through [`AuthorityFix`], which rewrites an
//! invalid `:authority` in the client's header blocks to `localhost` and
//! passes every other byte as it came. The server's side goes back
//! untouched.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::Stream;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer must accept (the protocol's default
/// SETTINGS_MAX_FRAME_SIZE): re-encoded header blocks are split at it.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is refused (h2's own default limit on
/// a header list is 16 KiB; a client's block cannot usefully exceed it).
const MAX_BLOCK: usize = 1 << 20;
/// What the relay buffers between the client and the server.
const RELAY_BUFFER: usize = 64 * 1024;

/// Rewrites invalid `:authority` values in the frames a client sends:
/// header blocks are decoded (with the client's dynamic table) and encoded
/// again (with the server's), every other frame passes unchanged.
pub struct AuthorityFix {
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// A header block waiting for its CONTINUATION frames.
    pending: Option<Pending>,
}

/// A header block being received.
struct Pending {
    /// The HEADERS frame's flags.
    flags: u8,
    /// Its stream id, as sent.
    stream: [u8; 4],
    /// Its priority fields, if it had them.
    priority: Vec<u8>,
    /// The fragments so far.
    block: Vec<u8>,
}

impl Default for AuthorityFix {
    fn default() -> Self {
        AuthorityFix {
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            pending: None,
        }
    }
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

impl AuthorityFix {
    /// Takes one frame (its 9-byte header and payload) and appends what to
    /// pass on to `out`.
    pub fn frame(&mut self, head: [u8; 9], payload: Vec<u8>, out: &mut Vec<u8>) -> io::Result<()> {
        let (kind, flags) = (head[3], head[4]);
        let stream = [head[5], head[6], head[7], head[8]];
        match (kind, &mut self.pending) {
            (HEADERS, None) => {
                let mut body = payload.as_slice();
                if flags & PADDED != 0 {
                    let (&pad, rest) = body.split_first().ok_or_else(|| invalid("empty padded HEADERS"))?;
                    body = rest
                        .get(..rest.len().saturating_sub(usize::from(pad)))
                        .filter(|_| usize::from(pad) <= rest.len())
                        .ok_or_else(|| invalid("HEADERS padding longer than the frame"))?;
                }
                let priority = if flags & PRIORITY != 0 {
                    let (fields, rest) = body
                        .split_at_checked(5)
                        .ok_or_else(|| invalid("HEADERS too short for its priority"))?;
                    body = rest;
                    fields.to_vec()
                } else {
                    Vec::new()
                };
                self.pending = Some(Pending {
                    flags,
                    stream,
                    priority,
                    block: body.to_vec(),
                });
                if flags & END_HEADERS != 0 {
                    self.finish(out)?;
                }
                Ok(())
            }
            (CONTINUATION, Some(pending)) if pending.stream == stream => {
                if pending.block.len() + payload.len() > MAX_BLOCK {
                    return Err(invalid("header block too large"));
                }
                pending.block.extend_from_slice(&payload);
                if flags & END_HEADERS != 0 {
                    self.finish(out)?;
                }
                Ok(())
            }
            (_, Some(_)) => Err(invalid("a header block was interrupted")),
            (_, None) => {
                out.extend_from_slice(&head);
                out.extend_from_slice(&payload);
                Ok(())
            }
        }
    }

    /// Decodes the pending header block, fixes its authority, and appends it
    /// encoded again as HEADERS (and CONTINUATION) frames.
    fn finish(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let Some(Pending {
            flags,
            stream,
            priority,
            block,
        }) = self.pending.take()
        else {
            return Ok(());
        };
        let mut headers = self
            .decoder
            .decode(&block)
            .map_err(|e| invalid(format!("header block: {e:?}")))?;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = b"localhost".to_vec();
            }
        }
        let mut encoded = priority;
        let fields = headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice()));
        encoded.extend(self.encoder.encode(fields));
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let kind = if first { HEADERS } else { CONTINUATION };
            let mut flags = if first { flags & (END_STREAM | PRIORITY) } else { 0 };
            if chunks.peek().is_none() {
                flags |= END_HEADERS;
            }
            let len = u32::try_from(chunk.len()).unwrap_or(u32::MAX).to_be_bytes();
            out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
            out.extend_from_slice(&stream);
            out.extend_from_slice(chunk);
            first = false;
        }
        Ok(())
    }
}

/// Relays `client` to `server`: the client's frames through
/// [`AuthorityFix`], the server's bytes as they are.
async fn relay(client: UnixStream, server: DuplexStream) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let up = async {
        let result = forward(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
        result
    };
    let down = tokio::io::copy(&mut server_read, &mut client_write);
    let (up, _) = tokio::join!(up, down);
    if let Err(e) = up {
        tracing::debug!(error = %e, "Unix socket connection ended");
    }
}

/// The client's side of [`relay`]: the preface, then frame by frame.
async fn forward(
    client_read: &mut tokio::net::unix::OwnedReadHalf,
    server_write: &mut tokio::io::WriteHalf<DuplexStream>,
) -> io::Result<()> {
    {
        let mut preface = [0u8; 24];
        client_read.read_exact(&mut preface).await?;
        if &preface != PREFACE {
            return Err(invalid("not an HTTP/2 connection"));
        }
        server_write.write_all(&preface).await?;
        let mut fix = AuthorityFix::default();
        let mut out = Vec::new();
        loop {
            let mut head = [0u8; 9];
            match client_read.read_exact(&mut head).await {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                other => other?,
            };
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            if len > MAX_BLOCK {
                return Err(invalid("frame too large"));
            }
            let mut payload = vec![0u8; len];
            client_read.read_exact(&mut payload).await?;
            fix.frame(head, payload, &mut out)?;
            server_write.write_all(&out).await?;
            out.clear();
        }
    }
}

/// The connections accepted on `listener`, each relayed (see the module
/// documentation), as a stream for `serve_with_incoming_shutdown`.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<DuplexStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await;
            let item = accepted.map(|(client, _)| {
                let (server, ours) = tokio::io::duplex(RELAY_BUFFER);
                tokio::spawn(relay(client, ours));
                server
            });
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> ([u8; 9], Vec<u8>) {
        let len = (payload.len() as u32).to_be_bytes();
        let s = stream.to_be_bytes();
        (
            [len[1], len[2], len[3], kind, flags, s[0], s[1], s[2], s[3]],
            payload.to_vec(),
        )
    }

    /// The header lists of the HEADERS blocks in `bytes`, decoded as the
    /// server would.
    fn server_sees(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut lists = Vec::new();
        let mut block = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = usize::from(bytes[at]) << 16 | usize::from(bytes[at + 1]) << 8 | usize::from(bytes[at + 2]);
            let (kind, flags) = (bytes[at + 3], bytes[at + 4]);
            let payload = &bytes[at + 9..at + 9 + len];
            if kind == HEADERS || kind == CONTINUATION {
                let skip = if kind == HEADERS && flags & PRIORITY != 0 { 5 } else { 0 };
                block.extend_from_slice(&payload[skip..]);
                if flags & END_HEADERS != 0 {
                    lists.push(decoder.decode(&block).unwrap());
                    block.clear();
                }
            }
            at += 9 + len;
        }
        lists
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_the_rest_is_kept() {
        let mut client = loona_hpack::Encoder::new();
        let request = |authority: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
            vec![
                (b":method".to_vec(), b"POST".to_vec()),
                (b":scheme".to_vec(), b"http".to_vec()),
                (b":path".to_vec(), b"/tollgate.v1.Quota/Reserve".to_vec()),
                (b":authority".to_vec(), authority.to_vec()),
                (b"te".to_vec(), b"trailers".to_vec()),
            ]
        };
        let encode = |client: &mut loona_hpack::Encoder<'_>, list: &[(Vec<u8>, Vec<u8>)]| {
            client.encode(list.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
        };
        let mut fix = AuthorityFix::default();
        let mut out = Vec::new();
        // A padded HEADERS block, its second request split over a
        // CONTINUATION, a DATA frame between, and a valid authority kept.
        let first = encode(&mut client, &request(b"/var/run/tollgate/quota.sock"));
        let mut padded = vec![3];
        padded.extend_from_slice(&first);
        padded.extend_from_slice(&[0, 0, 0]);
        let (h, p) = frame(HEADERS, END_HEADERS | PADDED, 1, &padded);
        fix.frame(h, p, &mut out).unwrap();
        let (h, p) = frame(0x0, END_STREAM, 1, b"data");
        fix.frame(h, p, &mut out).unwrap();
        let second = encode(&mut client, &request(b"%2Fvar%2Frun%2Fquota.sock"));
        let (a, b) = second.split_at(second.len() / 2);
        let (h, p) = frame(HEADERS, END_STREAM, 3, a);
        fix.frame(h, p, &mut out).unwrap();
        let (h, p) = frame(CONTINUATION, END_HEADERS, 3, b);
        fix.frame(h, p, &mut out).unwrap();
        let third = encode(&mut client, &request(b"tollgate.local:50051"));
        let (h, p) = frame(HEADERS, END_HEADERS, 5, &third);
        fix.frame(h, p, &mut out).unwrap();

        let seen = server_sees(&out);
        assert_eq!(
            seen,
            vec![
                request(b"localhost"),
                request(b"localhost"),
                request(b"tollgate.local:50051")
            ]
        );
        assert!(
            out.windows(8).any(|w| w == [0, 0, 4, 0, END_STREAM, 0, 0, 0]),
            "DATA passed"
        );
    }

    #[test]
    fn an_interrupted_header_block_is_refused() {
        let mut fix = AuthorityFix::default();
        let mut out = Vec::new();
        let (h, p) = frame(HEADERS, 0, 1, &[0x82]);
        fix.frame(h, p, &mut out).unwrap();
        let (h, p) = frame(0x0, 0, 1, b"x");
        assert!(fix.frame(h, p, &mut out).is_err());
    }
}
