//! fs3's protobuf messages and gRPC services.

/// The cluster manager's API and replicated state.
pub mod mgmtd {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("fs3.mgmtd.v1");
}

/// The metadata service's API and replicated state.
pub mod meta {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("fs3.meta.v1");
}

/// The storage data plane: headers of ff-net frames.
pub mod storage {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("fs3.storage.v1");

    /// ff-net method numbers of the storage service.
    pub mod method {
        /// A chain write (`WriteRequest`, payload: data).
        pub const WRITE: u16 = 1;
        /// A read (`ReadRequest`; reply payload: data).
        pub const READ: u16 = 2;
        /// List a target's chunks (`DumpMetaRequest`).
        pub const DUMP_META: u16 = 3;
        /// Recovery finished (`SyncDoneRequest`).
        pub const SYNC_DONE: u16 = 4;
    }

    /// ff-net fault codes of the storage service.
    pub mod fault {
        /// Something failed inside the service.
        pub const INTERNAL: u16 = 1;
        /// The request's chain version is not the service's; the message is the current one.
        pub const STALE_CHAIN: u16 = 2;
        /// The target does not serve this kind of request in its current state.
        pub const NOT_SERVING: u16 = 3;
        /// Only a pending version exists here; read from another replica or retry.
        pub const PENDING: u16 = 4;
        /// No such chunk.
        pub const NOT_FOUND: u16 = 5;
        /// The request is malformed or out of range.
        pub const BAD_REQUEST: u16 = 6;
        /// The target's disk is full.
        pub const NO_SPACE: u16 = 7;
        /// The stored chunk fails its checksum (it is being repaired).
        pub const CORRUPT: u16 = 8;
        /// The target is not on this service.
        pub const UNKNOWN_TARGET: u16 = 9;
        /// The write could not be passed down the chain in time.
        pub const CHAIN_UNAVAILABLE: u16 = 10;
    }
}
