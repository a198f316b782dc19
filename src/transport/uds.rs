//! Unix-socket connections whose clients name the socket as `:authority`.
//!
//! grpcio (Python, C++) and grpc-java send a Unix socket's path (or its
//! percent-encoding) as the HTTP/2 `:authority`, which is not a valid
//! authority; the HTTP/2 server under tonic (h2) then resets every stream
//! with `PROTOCOL_ERROR`. Every connection accepted on Tollgate's Unix
//! sockets is therefore read through [`Conn`]: a connection whose first
//! header block names a valid authority passes untouched; one that does not
//! has every header block re-encoded by [`AuthorityFix`] with `localhost`
//! in its place. What the server writes goes straight to the socket.
//!
//! Why one file: the connection wrapper, the frame reading it needs and the
//! header re-encoding are one mechanism (about 450 lines; the rest is its
//! tests); apart, neither part reads on its own.

use std::io;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt};

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
/// A header block larger than this is refused (the server refuses a
/// header list over 16 KiB; a client's compressed block cannot usefully
/// exceed it).
const MAX_BLOCK: usize = 64 << 10;
/// A decoded header list larger than this is refused, counted as HTTP/2
/// counts SETTINGS_MAX_HEADER_LIST_SIZE (name, value and 32 octets per
/// field): a small block of references to one large table entry must not
/// decode into a huge list (an HPACK bomb), and this runs before any
/// authentication.
const MAX_HEADER_LIST: usize = 64 << 10;
/// The dynamic table a client may ask for (HPACK's default): larger size
/// updates are refused.
const MAX_TABLE: usize = 4_096;

/// Rewrites invalid `:authority` values in the frames a client sends:
/// header blocks are decoded (with the client's dynamic table) and encoded
/// again (with the server's), every other frame passes unchanged.
pub struct AuthorityFix {
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// A header block waiting for its CONTINUATION frames.
    pending: Option<Pending>,
    /// Header blocks completed so far.
    blocks: u64,
    /// Some block's authority was replaced.
    changed: bool,
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
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE);
        AuthorityFix {
            decoder,
            encoder: loona_hpack::Encoder::new(),
            pending: None,
            blocks: 0,
            changed: false,
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
                if body.len() > MAX_BLOCK {
                    return Err(invalid("header block too large"));
                }
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
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&block, |name, value| {
                // Counted whole, kept only while within the bound: the
                // rest of the block is still decoded (its table entries
                // matter to later blocks), never stored.
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_HEADER_LIST {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| invalid(format!("header block: {e:?}")))?;
        if size > MAX_HEADER_LIST {
            return Err(invalid(format!(
                "header list of {size} octets decoded; at most {MAX_HEADER_LIST} are accepted"
            )));
        }
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = b"localhost".to_vec();
                self.changed = true;
            }
        }
        self.blocks += 1;
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

/// A client connection on a Unix socket, as the server reads it.
///
/// Until the first header block is complete, the client's frames are
/// decoded ([`AuthorityFix`]). If its `:authority` is valid, everything
/// from then on passes untouched (a channel keeps one authority, and an
/// untouched connection costs nothing); if not, every header block of the
/// connection is re-encoded with the authority fixed. What the server
/// writes goes straight to the socket.
pub struct Conn<S = crate::transport::conn::Guarded<UnixStream>> {
    /// The socket, guarded as TCP connections are ([`crate::transport::conn`]).
    inner: S,
    reader: Reader,
    /// `reader.output` is read by the server from here.
    at: usize,
}

/// What the server reads of a client's connection, computed from what the
/// client sent, without I/O (the fuzz target `uds_frames` drives it).
pub struct Reader {
    mode: Mode,
    /// Read from the client, not yet passed on.
    input: Vec<u8>,
    /// Ready for the server to read.
    output: Vec<u8>,
}

impl Default for Reader {
    fn default() -> Self {
        Reader {
            mode: Mode::Preface(AuthorityFix::default()),
            input: Vec::new(),
            output: Vec::new(),
        }
    }
}

/// A frame: its 9-byte header, its payload, and its bytes as sent.
type Frame = ([u8; 9], Vec<u8>, Vec<u8>);

enum Mode {
    /// The preface is still to come.
    Preface(AuthorityFix),
    /// Before the first header block is complete: what came so far, as
    /// sent, in case it can pass untouched.
    Sniffing(AuthorityFix, Vec<u8>),
    /// Every header block re-encoded.
    Fixing(AuthorityFix),
    /// Everything as sent.
    Passing,
}

impl<S> Conn<S> {
    fn new(inner: S) -> Conn<S> {
        Conn {
            inner,
            reader: Reader::default(),
            at: 0,
        }
    }
}

impl Reader {
    /// Takes what the client sent next; what the server may read of it is
    /// in [`Reader::output`]. An error closes the connection.
    pub fn feed(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.input.extend_from_slice(bytes);
        self.process()
    }

    /// What the server may read so far.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Moves whatever complete units `input` holds to `output`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            let mode = std::mem::replace(&mut self.mode, Mode::Passing);
            let (next, more) = self.step(mode)?;
            self.mode = next;
            if !more {
                return Ok(());
            }
        }
    }

    /// One unit of `input` under `mode`: the next mode, and whether there
    /// may be more to do.
    fn step(&mut self, mode: Mode) -> io::Result<(Mode, bool)> {
        match mode {
            Mode::Passing => {
                self.output.append(&mut self.input);
                Ok((Mode::Passing, false))
            }
            Mode::Preface(fix) => {
                if self.input.len() < PREFACE.len() {
                    return Ok((Mode::Preface(fix), false));
                }
                if &self.input[..PREFACE.len()] != PREFACE {
                    return Err(invalid("not an HTTP/2 connection"));
                }
                self.output.extend(self.input.drain(..PREFACE.len()));
                Ok((Mode::Sniffing(fix, Vec::new()), true))
            }
            Mode::Sniffing(mut fix, mut held) => {
                let Some((head, payload, original)) = self.next_frame()? else {
                    return Ok((Mode::Sniffing(fix, held), false));
                };
                let blocks = fix.blocks;
                let mut fixed = Vec::new();
                fix.frame(head, payload, &mut fixed)?;
                held.extend_from_slice(&original);
                if fix.blocks == blocks {
                    // No header block completed: frames outside one pass
                    // as sent; a block's first frames wait for its end.
                    if fix.pending.is_none() {
                        self.output.append(&mut held);
                    }
                    return Ok((Mode::Sniffing(fix, held), true));
                }
                if fix.changed {
                    self.output.extend_from_slice(&fixed);
                    Ok((Mode::Fixing(fix), true))
                } else {
                    self.output.append(&mut held);
                    Ok((Mode::Passing, true))
                }
            }
            Mode::Fixing(mut fix) => {
                let Some((head, payload, _)) = self.next_frame()? else {
                    return Ok((Mode::Fixing(fix), false));
                };
                fix.frame(head, payload, &mut self.output)?;
                Ok((Mode::Fixing(fix), true))
            }
        }
    }

    /// The next whole frame in `input`, taken out: its header, its payload
    /// and its bytes as sent.
    fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        if self.input.len() < 9 {
            return Ok(None);
        }
        let len = usize::from(self.input[0]) << 16 | usize::from(self.input[1]) << 8 | usize::from(self.input[2]);
        if len > MAX_BLOCK {
            return Err(invalid("frame too large"));
        }
        if self.input.len() < 9 + len {
            return Ok(None);
        }
        let original: Vec<u8> = self.input.drain(..9 + len).collect();
        let mut head = [0u8; 9];
        head.copy_from_slice(&original[..9]);
        Ok(Some((head, original[9..].to_vec(), original)))
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Conn<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            let reader = &mut this.reader;
            if this.at < reader.output.len() {
                let n = buf.remaining().min(reader.output.len() - this.at);
                buf.put_slice(&reader.output[this.at..this.at + n]);
                this.at += n;
                if this.at == reader.output.len() {
                    reader.output.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if matches!(reader.mode, Mode::Passing) && reader.input.is_empty() {
                return std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut scratch = [0u8; 16 * 1024];
            let mut read = tokio::io::ReadBuf::new(&mut scratch);
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // End of stream: pass on what is left as it came.
                    let reader = &mut this.reader;
                    reader.output.append(&mut reader.input);
                    if reader.output.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    this.reader.feed(read.filled())?;
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Conn<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Conn<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::Connected::connect_info(&self.inner)
    }
}

/// The connections accepted on `listener` (see [`Conn`]) into `places`,
/// as TCP connections are ([`crate::transport::conn::incoming`]: at most so many open
/// at once on the plane, the preface's deadline), as a stream for
/// `serve_with_incoming_shutdown`.
pub fn incoming(
    listener: UnixListener,
    places: crate::transport::conn::Places,
) -> impl Stream<Item = io::Result<Conn>> {
    crate::transport::conn::incoming(listener, places).map(|accepted| accepted.map(Conn::new))
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

    /// What the server reads through [`Conn`] when a client writes
    /// `sent` and closes.
    async fn through_conn(sent: Vec<u8>) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        let mut read = Vec::new();
        Conn::new(server).read_to_end(&mut read).await.unwrap();
        read
    }

    #[tokio::test]
    async fn a_connection_with_a_valid_authority_passes_as_sent_and_one_without_is_fixed() {
        let list = |authority: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
            vec![
                (b":path".to_vec(), b"/x".to_vec()),
                (b":authority".to_vec(), authority.to_vec()),
            ]
        };
        // A client's connection: preface, SETTINGS, two requests.
        let connection = |authority: &[u8]| {
            let mut client = loona_hpack::Encoder::new();
            let mut bytes = PREFACE.to_vec();
            let (h, p) = frame(0x4, 0, 0, &[]);
            bytes.extend_from_slice(&h);
            bytes.extend_from_slice(&p);
            for stream in [1, 3] {
                let l = list(authority);
                let block = client.encode(l.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
                let (h, p) = frame(HEADERS, END_HEADERS, stream, &block);
                bytes.extend_from_slice(&h);
                bytes.extend_from_slice(&p);
            }
            bytes
        };
        let valid = connection(b"localhost:1");
        assert_eq!(through_conn(valid.clone()).await, valid, "untouched");
        let read = through_conn(connection(b"/run/tollgate/quota.sock")).await;
        assert!(read.starts_with(PREFACE));
        assert_eq!(
            server_sees(&read[PREFACE.len()..]),
            vec![list(b"localhost"), list(b"localhost")]
        );
    }

    /// A header block whose first field adds a 4,000-octet value to the
    /// dynamic table, then refers to it once per octet.
    fn bomb(references: usize) -> Vec<u8> {
        let mut block = vec![0x40, 0x01, b'x'];
        // A 4,000-octet value: its length as an HPACK integer (7-bit prefix).
        block.extend([0x7f, 0xa1, 0x1e]);
        block.extend(std::iter::repeat_n(b'a', 4_000));
        // 0xBE: indexed field 62, the newest dynamic table entry.
        block.extend(std::iter::repeat_n(0xbe, references));
        block
    }

    #[test]
    fn an_hpack_bomb_is_refused_without_decoding_it_whole() {
        let mut fix = AuthorityFix::default();
        let mut out = Vec::new();
        // 5,000 octets that would decode to 20 MB of headers.
        let (h, p) = frame(HEADERS, END_HEADERS, 1, &bomb(5_000));
        let refused = fix.frame(h, p, &mut out).unwrap_err();
        assert!(refused.to_string().contains("header list"), "{refused}");
        assert!(out.is_empty(), "nothing passed on");
        // A list of a few such fields is still fine.
        let mut fix = AuthorityFix::default();
        let (h, p) = frame(HEADERS, END_HEADERS, 1, &bomb(3));
        fix.frame(h, p, &mut out).unwrap();
        assert_eq!(server_sees(&out)[0].len(), 4);
    }

    #[test]
    fn a_dynamic_table_larger_than_the_default_is_refused() {
        let mut fix = AuthorityFix::default();
        // A size update to 1 MiB (5-bit prefix), then one indexed field.
        let (h, p) = frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0xff, 0x3f, 0x82]);
        assert!(fix.frame(h, p, &mut Vec::new()).is_err());
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
