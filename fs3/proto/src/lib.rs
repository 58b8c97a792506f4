//! fs3's protobuf messages and gRPC services.

/// The cluster manager's API and replicated state.
pub mod mgmtd {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("fs3.mgmtd.v1");
}
