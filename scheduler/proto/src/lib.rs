//! hai's protobuf messages and gRPC services: the scheduler API (`Hai`), the agents' API
//! (`Agent`), and the records of the replicated state.

#![allow(missing_docs, clippy::all, clippy::pedantic)]
tonic::include_proto!("hai.v1");
