//! The `ff-kv` binary (placeholder until the CLI lands).
fn main() {}
