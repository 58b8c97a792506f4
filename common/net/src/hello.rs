//! The first bytes of every ff-net connection: the client says which transports it can use, the
//! server picks one (RDMA when both can, else TCP) or refuses with a reason, both in 8 bytes:
//!
//! ```text
//! client: "FFH1" | offer u8 (0 TCP, 1 TCP or RDMA, 2 RDMA only) | 3 zero bytes
//! server: "FFH1" | choice u8 (0 TCP, 1 RDMA, 2 refused: client wants RDMA, 3 refused: server does) | 3 zero bytes
//! ```
//!
//! With RDMA chosen, the same TCP connection then carries the queue pair handshake and stays
//! open beside it (see `rdma::link`).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{NetError, TransportKind};

const MAGIC: [u8; 4] = *b"FFH1";

/// What a side of a connection can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Abilities {
    /// RDMA is available here.
    pub rdma: bool,
    /// Only RDMA is acceptable (`transport = "rdma"`).
    pub rdma_only: bool,
}

impl Abilities {
    /// What `transport` allows, given whether this process has RDMA.
    pub(crate) fn of(transport: TransportKind, rdma_here: bool) -> Abilities {
        Abilities {
            rdma: rdma_here && transport != TransportKind::Tcp,
            rdma_only: transport == TransportKind::Rdma,
        }
    }

    fn offer(self) -> u8 {
        match (self.rdma, self.rdma_only) {
            (true, true) => 2,
            (true, false) => 1,
            _ => 0,
        }
    }
}

fn message(choice: u8) -> [u8; 8] {
    let mut out = [0; 8];
    out[..4].copy_from_slice(&MAGIC);
    out[4] = choice;
    out
}

async fn read_hello(stream: &mut TcpStream) -> Result<u8, NetError> {
    let mut bytes = [0; 8];
    stream.read_exact(&mut bytes).await?;
    if bytes[..4] != MAGIC {
        return Err(NetError::Protocol(
            "the peer does not speak ff-net (no hello)".to_string(),
        ));
    }
    Ok(bytes[4])
}

/// The client's side: whether the connection uses RDMA.
pub(crate) async fn client(stream: &mut TcpStream, mine: Abilities) -> Result<bool, NetError> {
    stream.write_all(&message(mine.offer())).await?;
    match read_hello(stream).await? {
        0 if mine.rdma_only => Err(NetError::Protocol(
            "the server chose TCP, but transport = \"rdma\" here".to_string(),
        )),
        0 => Ok(false),
        1 if mine.rdma => Ok(true),
        2 => Err(NetError::Protocol(
            "transport = \"rdma\" here, but the server has no RDMA; set transport = \"auto\" or \"tcp\"".to_string(),
        )),
        3 => Err(NetError::Protocol(
            "the server accepts RDMA only (transport = \"rdma\"), and this side has none".to_string(),
        )),
        other => Err(NetError::Protocol(format!(
            "the server chose transport {other}, which was not offered"
        ))),
    }
}

/// The server's side: whether the connection uses RDMA (a refused client gets the reason and
/// an error here).
pub(crate) async fn server(stream: &mut TcpStream, mine: Abilities) -> Result<bool, NetError> {
    let offer = read_hello(stream).await?;
    let choice = match offer {
        1 | 2 if mine.rdma => 1,
        2 => 2,
        0 | 1 if mine.rdma_only => 3,
        0 | 1 => 0,
        other => {
            return Err(NetError::Protocol(format!(
                "the client offered transport {other}"
            )));
        }
    };
    stream.write_all(&message(choice)).await?;
    match choice {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(NetError::Protocol(
            "refused a client: no transport both ends accept".to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the hello between a client and a server with these abilities.
    async fn negotiate(
        client_side: Abilities,
        server_side: Abilities,
    ) -> (Result<bool, NetError>, Result<bool, NetError>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            server(&mut stream, server_side).await
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let client_result = client(&mut stream, client_side).await;
        (client_result, serving.await.unwrap())
    }

    #[tokio::test]
    async fn rdma_when_both_can_tcp_otherwise_and_refusals_say_why() {
        use TransportKind::{Auto, Rdma, Tcp};
        let both = |c, s| async move {
            let (c, s) = negotiate(c, s).await;
            (c.map_err(|e| e.to_string()), s.map_err(|e| e.to_string()))
        };
        let able = |t| Abilities::of(t, true);
        let unable = |t| Abilities::of(t, false);
        assert_eq!(both(able(Auto), able(Auto)).await, (Ok(true), Ok(true)));
        assert_eq!(both(able(Auto), able(Tcp)).await, (Ok(false), Ok(false)));
        let refused = both(able(Tcp), able(Rdma)).await.0.unwrap_err();
        assert!(refused.contains("RDMA only"), "{refused}");
        assert_eq!(both(unable(Auto), able(Auto)).await, (Ok(false), Ok(false)));
        let (client_side, server_side) = both(able(Rdma), unable(Auto)).await;
        assert!(client_side.unwrap_err().contains("server has no RDMA"));
        assert!(server_side.is_err());
    }
}
