//! The codec of the `Peer` service (server and client): prost's, after a scan of each encoded
//! heartbeat that refuses one carrying more clients than any heartbeat may
//! ([`MAX_CLIENTS_PER_MESSAGE`]) before anything is decoded.
//!
//! Without it a member holding the cluster's credentials could make this agent allocate about
//! 50 times what it sends: a heartbeat of [`super::MAX_MESSAGE_BYTES`] made of empty reports is
//! two million of them, each decoded into a struct of about 100 bytes (some 200 MB) before the
//! count was checked. The scan reads only the top-level field keys and lengths, in place.
//!
//! The protobuf wire format (<https://protobuf.dev/programming-guides/encoding/>): each field
//! is a varint key (field number << 3 | wire type) and a value: a varint (type 0), 8 bytes (1),
//! a varint length and that many bytes (2), or 4 bytes (5); types 3 and 4 (groups) are not in
//! proto3 and are refused.

use prost::bytes::Buf as _;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstDecoder, ProstEncoder};

use crate::proto::cluster::Heartbeat;

/// Most clients one heartbeat may carry reports or grants for: as many of each, every field at
/// its longest, still fit [`super::MAX_MESSAGE_BYTES`] (80 bytes a report, 84 a grant: see
/// `tests::the_fullest_heartbeat_fits_the_message_cap`). It was 30,000, which could not: such a
/// heartbeat would fail to encode.
pub const MAX_CLIENTS_PER_MESSAGE: usize = 25_000;

/// `Heartbeat.reports` and `Heartbeat.grants` (proto/cluster.proto).
const REPORTS_FIELD: u64 = 9;
const GRANTS_FIELD: u64 = 10;

/// The `Peer` service's codec (see the module docs); named by the generated code
/// (`limiter-user/build.rs`).
#[derive(Debug, Default, Clone, Copy)]
pub struct PeerCodec;

impl Codec for PeerCodec {
    type Encode = Heartbeat;
    type Decode = Heartbeat;
    type Encoder = ProstEncoder<Heartbeat>;
    type Decoder = PeerDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        PeerDecoder(ProstDecoder::new(BufferSettings::default()))
    }
}

/// prost's decoder behind [`check`].
#[derive(Debug)]
pub struct PeerDecoder(ProstDecoder<Heartbeat>);

impl Decoder for PeerDecoder {
    type Item = Heartbeat;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Heartbeat>, Status> {
        // The message is one contiguous buffer (tonic reads it whole into a `BytesMut`); were it
        // not, the scan would not see all of it, so it refuses rather than pass it unchecked.
        let chunk = buf.chunk();
        if chunk.len() != buf.remaining() {
            return Err(Status::internal(
                "a peer message was not in one buffer: not decoded",
            ));
        }
        check(chunk)?;
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Refuses an encoded heartbeat with more than [`MAX_CLIENTS_PER_MESSAGE`] reports or grants,
/// or one that is not well formed at the top level.
pub fn check(mut bytes: &[u8]) -> Result<(), Status> {
    let malformed = |what: &str| Status::invalid_argument(format!("a malformed heartbeat: {what}"));
    let (mut reports, mut grants) = (0usize, 0usize);
    while !bytes.is_empty() {
        let key = varint(&mut bytes).ok_or_else(|| malformed("a field key is cut off"))?;
        let field = key >> 3;
        let len = match key & 7 {
            0 => {
                varint(&mut bytes)
                    .ok_or_else(|| malformed("a varint is cut off or over 10 bytes"))?;
                0
            }
            1 => 8,
            2 => {
                usize::try_from(varint(&mut bytes).ok_or_else(|| malformed("a length is cut off"))?)
                    .map_err(|_| malformed("a length is out of range"))?
            }
            5 => 4,
            other => return Err(malformed(&format!("wire type {other}"))),
        };
        if len > bytes.len() {
            return Err(malformed("a field runs past the message"));
        }
        bytes = &bytes[len..];
        match field {
            REPORTS_FIELD => reports += 1,
            GRANTS_FIELD => grants += 1,
            _ => continue,
        }
        if reports > MAX_CLIENTS_PER_MESSAGE || grants > MAX_CLIENTS_PER_MESSAGE {
            return Err(Status::invalid_argument(format!(
                "more than {MAX_CLIENTS_PER_MESSAGE} clients in one heartbeat: refused before \
                 decoding"
            )));
        }
    }
    Ok(())
}

/// Reads a varint (at most 10 bytes), advancing `bytes`; `None` if it is cut off or too long.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::proto::cluster::{ClientGrant, ClientReport};

    fn heartbeat(reports: usize, grants: usize) -> Heartbeat {
        Heartbeat {
            node_id: "n1".into(),
            seq: 300,
            view_hash: u64::MAX,
            nonce: 7,
            reports: vec![
                ClientReport {
                    client: vec![1; 16],
                    demand: 70_000,
                    ..ClientReport::default()
                };
                reports
            ],
            grants: vec![ClientGrant::default(); grants],
            ..Heartbeat::default()
        }
    }

    #[test]
    fn heartbeats_up_to_the_cap_pass_and_decode_as_prost_does() {
        for (reports, grants) in [(0, 0), (1, 0), (0, 1), (MAX_CLIENTS_PER_MESSAGE, 3)] {
            let hb = heartbeat(reports, grants);
            let bytes = hb.encode_to_vec();
            check(&bytes).expect("passes");
            assert_eq!(Heartbeat::decode(bytes.as_slice()).expect("decodes"), hb);
        }
    }

    #[test]
    fn more_clients_than_the_cap_are_refused_unread() {
        for (reports, grants) in [
            (MAX_CLIENTS_PER_MESSAGE + 1, 0),
            (0, MAX_CLIENTS_PER_MESSAGE + 1),
        ] {
            let e = check(&heartbeat(reports, grants).encode_to_vec()).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("more than 25000 clients"), "{e:?}");
        }
        // Two million empty reports, as a hostile member would send: two bytes each.
        let mut bytes = Vec::new();
        for _ in 0..2_000_000 {
            bytes.extend_from_slice(&[(REPORTS_FIELD << 3 | 2) as u8, 0]);
        }
        let e = check(&bytes).expect_err("two million reports");
        assert!(e.message().starts_with("more than 25000 clients"), "{e:?}");
    }

    #[test]
    fn the_fullest_heartbeat_fits_the_message_cap() {
        use crate::proto::cluster::GrantValue;
        let report = ClientReport {
            client: vec![0xff; 16],
            policy: u64::MAX,
            seq: u64::MAX,
            demand: u32::MAX,
            applied: Some(u64::MAX),
            echo: Some(u64::MAX),
            raise_left_ms: Some(u32::MAX),
            used: u32::MAX,
        };
        let grant = ClientGrant {
            client: vec![0xff; 16],
            policy: u64::MAX,
            message: u64::MAX,
            grant: Some(GrantValue {
                seq: u64::MAX,
                value: u32::MAX,
                answers: u64::MAX,
            }),
            release: true,
            lease_ms: u32::MAX,
            silence_ms: u32::MAX,
        };
        assert_eq!((report.encoded_len(), grant.encoded_len()), (78, 82));
        let hb = Heartbeat {
            node_id: "n".repeat(64),
            incarnation: u64::MAX,
            seq: u64::MAX,
            echo: u64::MAX,
            members: u32::MAX,
            view_hash: u64::MAX,
            nonce: u64::MAX,
            policies_hash: u64::MAX,
            share_members: u32::MAX,
            reports: vec![report; MAX_CLIENTS_PER_MESSAGE],
            grants: vec![grant; MAX_CLIENTS_PER_MESSAGE],
            to_node_id: "n".repeat(64),
        };
        let len = hb.encoded_len();
        assert!(len <= super::super::MAX_MESSAGE_BYTES, "{len} bytes");
        check(&hb.encode_to_vec()).expect("passes");
    }

    #[test]
    fn malformed_messages_are_refused_with_what_is_wrong() {
        let bytes = heartbeat(2, 2).encode_to_vec();
        for cut in [1, bytes.len() - 1] {
            let e = check(&bytes[..cut]).expect_err("cut off");
            assert!(e.message().starts_with("a malformed heartbeat"), "{e:?}");
        }
        let e = check(&[(1 << 3 | 3) as u8]).expect_err("a group");
        assert!(e.message().contains("wire type 3"), "{e:?}");
        let e = check(&[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ])
        .expect_err("an 11-byte varint");
        assert!(e.message().contains("cut off"), "{e:?}");
    }
}
