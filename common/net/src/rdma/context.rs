//! What a process's RDMA connections share: the device, one protection domain, the bounded pool
//! of registered buffers and the bound on concurrent one-sided transfers. Made once per device
//! and kept while some client or server uses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Semaphore;

use super::pool::RegisteredPool;
use super::verbs::{Device, ProtectionDomain, RdmaError};
use crate::NetConfig;

/// The RDMA state a process's connections share.
#[derive(Debug)]
pub struct Context {
    pub(crate) pd: Arc<ProtectionDomain>,
    pub(crate) pool: Arc<RegisteredPool>,
    pub(crate) transfers: Arc<Semaphore>,
}

/// Contexts by device name ("" for "the first active one").
static CONTEXTS: Mutex<Option<HashMap<String, Weak<Context>>>> = Mutex::new(None);

impl Context {
    /// The context of `config.rdma_device`, opened now or shared with the process's other users
    /// (the first user's memory and transfer bounds apply).
    pub fn shared(config: &NetConfig) -> Result<Arc<Context>, RdmaError> {
        let mut contexts = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
        let contexts = contexts.get_or_insert_with(HashMap::new);
        if let Some(context) = contexts.get(&config.rdma_device).and_then(Weak::upgrade) {
            return Ok(context);
        }
        let device = Device::open(&config.rdma_device)?;
        let pd = ProtectionDomain::new(&device)?;
        let context = Arc::new(Context {
            pool: RegisteredPool::new(&pd, config.rdma_memory.as_usize()),
            pd,
            transfers: Arc::new(Semaphore::new(config.rdma_transfers)),
        });
        tracing::info!(device = device.name(), "RDMA available");
        contexts.insert(config.rdma_device.clone(), Arc::downgrade(&context));
        Ok(context)
    }
}
