//! The three requests the `latency` and `spawn-ratio` benchmarks send, each
//! bounded, with an error message that names the VM and the status.

use std::time::Duration;

use cocos_core::proto::{CreateReq, CreateRes, CvmInfoReq, RemoveReq};

use crate::daemon::Client;

/// CreateVm of the plainest VM (what `scale` creates too).
pub async fn create(client: &mut Client, limit: Duration) -> Result<CreateRes, String> {
    let req = CreateReq {
        agent_log_level: "info".to_string(),
        ..CreateReq::default()
    };
    match tokio::time::timeout(limit, client.create_vm(req)).await {
        Ok(Ok(res)) => Ok(res.into_inner()),
        Ok(Err(status)) => Err(format!(
            "CreateVm: {:?}: {}",
            status.code(),
            status.message()
        )),
        Err(_) => Err(format!("CreateVm: no answer within {limit:?}")),
    }
}

pub async fn remove(client: &mut Client, id: &str, limit: Duration) -> Result<(), String> {
    let req = RemoveReq {
        cvm_id: id.to_string(),
    };
    match tokio::time::timeout(limit, client.remove_vm(req)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!(
            "RemoveVm {id}: {:?}: {}",
            status.code(),
            status.message()
        )),
        Err(_) => Err(format!("RemoveVm {id}: no answer within {limit:?}")),
    }
}

/// CVMInfo of `id`; the answer must name that VM.
pub async fn info(client: &mut Client, id: &str, limit: Duration) -> Result<(), String> {
    let req = CvmInfoReq { id: id.to_string() };
    match tokio::time::timeout(limit, client.cvm_info(req)).await {
        Ok(Ok(res)) if res.get_ref().id == id => Ok(()),
        Ok(Ok(res)) => Err(format!("CVMInfo: asked {id}, got {}", res.get_ref().id)),
        Ok(Err(status)) => Err(format!(
            "CVMInfo {id}: {:?}: {}",
            status.code(),
            status.message()
        )),
        Err(_) => Err(format!("CVMInfo {id}: no answer within {limit:?}")),
    }
}

/// Keeps the count of failures and the first few messages, so that a
/// failure repeated thousands of times under load makes one report line.
#[derive(Debug, Default, Clone)]
pub struct Errors {
    pub count: usize,
    pub first: Vec<String>,
}

impl Errors {
    const KEPT: usize = 3;

    pub fn push(&mut self, error: String) {
        self.count += 1;
        if self.first.len() < Self::KEPT {
            self.first.push(error);
        }
    }

    pub fn merge(&mut self, other: Errors) {
        self.count += other.count;
        for e in other.first {
            if self.first.len() < Self::KEPT {
                self.first.push(e);
            }
        }
    }

    /// `None` when nothing failed; else "N <what> failed; first: ...".
    pub fn line(&self, what: &str) -> Option<String> {
        let first = self.first.first()?;
        Some(format!(
            "{} {what} failed; first: {}",
            self.count,
            crate::summary::shorten(first)
        ))
    }
}
