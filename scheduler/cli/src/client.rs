//! How the CLI reaches the scheduler: server addresses and token from flags or the
//! environment (`HAI_SERVER`, `HAI_TOKEN`, `HAI_TOKEN_FILE`), calls that follow the leader, and
//! statuses turned into one-line errors.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use hai_proto::hai_client::HaiClient;
use hai_proto::{
    AddUserRequest, Empty, Job, JobRequest, JobSpec, ListJobsRequest, ListNodesReply, Quota,
    SetDrainRequest, SubmitRequest, User,
};

/// Where the scheduler is and who the caller is.
#[derive(clap::Args, Debug, Clone)]
pub struct Connect {
    /// hai server addresses, comma-separated.
    #[arg(
        long,
        global = true,
        env = "HAI_SERVER",
        default_value = "127.0.0.1:8300"
    )]
    server: String,
    /// The caller's token.
    #[arg(long, global = true, env = "HAI_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the caller's token.
    #[arg(long, global = true, env = "HAI_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl Connect {
    /// A client for these settings.
    pub fn client(&self) -> anyhow::Result<Client> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => token.trim().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?
                .trim()
                .to_string(),
            (None, None) => String::new(),
        };
        let servers: Vec<String> = self
            .server
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let options = ff_rpc::ClientOptions {
            total_timeout: std::time::Duration::from_secs(10),
            ..ff_rpc::ClientOptions::default()
        };
        let leader = ff_rpc::LeaderClient::new(servers, options)
            .map_err(|e| anyhow!("--server {}: {e}", self.server))?;
        Ok(Client { leader, token })
    }
}

/// A connected CLI.
pub struct Client {
    leader: ff_rpc::LeaderClient,
    token: String,
}

/// A status as a one-line error.
fn error(status: &tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            anyhow!("no hai server answered: {}", status.message())
        }
        _ => anyhow!("{}", status.message()),
    }
}

macro_rules! call {
    ($self:ident, $method:ident, $request:expr, $idempotent:ident) => {{
        let token = $self.token.clone();
        let request = $request;
        $self
            .leader
            .$idempotent(|channel| {
                let request = ff_rpc::with_token(tonic::Request::new(request.clone()), &token);
                async move { HaiClient::new(channel).$method(request).await }
            })
            .await
            .map_err(|s| error(&s))
    }};
}

impl Client {
    /// Queues a job (retried safely: the request id makes it one job).
    pub async fn submit(&self, spec: JobSpec) -> anyhow::Result<u64> {
        let request_id = ff_rpc::tokens::new_token();
        let reply = call!(
            self,
            submit,
            SubmitRequest {
                spec: Some(spec),
                request_id
            },
            call_idempotent
        )?;
        Ok(reply.job_id)
    }

    /// Jobs not ended (or all).
    pub async fn jobs(&self, all: bool) -> anyhow::Result<Vec<Job>> {
        Ok(call!(self, list_jobs, ListJobsRequest { all }, call_idempotent)?.jobs)
    }

    /// One job.
    pub async fn job(&self, id: u64) -> anyhow::Result<Job> {
        call!(self, get_job, JobRequest { job_id: id }, call_idempotent)
    }

    /// Cancels a job.
    pub async fn cancel(&self, id: u64) -> anyhow::Result<()> {
        call!(self, cancel, JobRequest { job_id: id }, call).map(|_| ())
    }

    /// Suspends a job.
    pub async fn suspend(&self, id: u64) -> anyhow::Result<()> {
        call!(self, suspend, JobRequest { job_id: id }, call).map(|_| ())
    }

    /// Nodes and their use.
    pub async fn nodes(&self) -> anyhow::Result<ListNodesReply> {
        call!(self, list_nodes, Empty {}, call_idempotent)
    }

    /// Drains or resumes a node.
    pub async fn set_drain(&self, node: &str, drain: bool) -> anyhow::Result<()> {
        call!(
            self,
            set_drain,
            SetDrainRequest {
                node: node.to_string(),
                drain
            },
            call_idempotent
        )
        .map(|_| ())
    }

    /// Adds a user; their token.
    pub async fn add_user(
        &self,
        name: &str,
        admin: bool,
        quotas: Vec<Quota>,
    ) -> anyhow::Result<String> {
        Ok(call!(
            self,
            add_user,
            AddUserRequest {
                name: name.to_string(),
                admin,
                quotas
            },
            call
        )?
        .token)
    }

    /// Every user.
    pub async fn users(&self) -> anyhow::Result<Vec<User>> {
        Ok(call!(self, list_users, Empty {}, call_idempotent)?.users)
    }

    /// Who the token acts as.
    pub async fn who_am_i(&self) -> anyhow::Result<User> {
        call!(self, who_am_i, Empty {}, call_idempotent)
    }
}
