//! The `Supervisor`: the registry of VMs. It admits creates (the VM limit is
//! checked and the VM registered in one step, so concurrent creates cannot
//! overshoot it), starts one `CvmActor` per VM and routes requests to it.
//! It never waits on a VM itself: a slow stop of one VM blocks nothing else.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use cocos_core::config::Config;
use cocos_core::guest::ValidatedCreate;
use cocos_core::proto::{CreateRes, CvmInfoRes};
use cocos_core::qemu::kernel_cmdline;
use futures::future::join_all;
use tracing::{info, warn};

use crate::cvm::{Boot, CvmActor, Services, Stop, VmGone, VmState};
use crate::error::ApiError;
use crate::ports::PortAllocator;
use crate::reaper::ZombieReaper;

#[derive(Message)]
#[rtype(result = "Result<CreateRes, ApiError>")]
pub struct CreateVm(pub ValidatedCreate);

#[derive(Message)]
#[rtype(result = "Result<(), ApiError>")]
pub struct RemoveVm(pub String);

#[derive(Message)]
#[rtype(result = "Result<CvmInfoRes, ApiError>")]
pub struct VmInfo(pub String);

/// A new configuration for VMs created from now on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UpdateConfig(pub Arc<Config>);

/// Refuse new work and stop every VM; answers when all are gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAll;

#[derive(Message)]
#[rtype(result = "Vec<VmSummary>")]
pub struct ListVms;

#[derive(Debug, Clone)]
pub struct VmSummary {
    pub running: bool,
}

struct VmEntry {
    addr: Addr<CvmActor>,
    info: CvmInfoRes,
    port: Option<u16>,
}

pub struct Supervisor {
    config: Arc<Config>,
    ports: Addr<PortAllocator>,
    reaper: Addr<ZombieReaper>,
    vms: HashMap<String, VmEntry>,
    accepting: bool,
}

impl Supervisor {
    pub fn new(
        config: Arc<Config>,
        ports: Addr<PortAllocator>,
        reaper: Addr<ZombieReaper>,
    ) -> Supervisor {
        Supervisor {
            config,
            ports,
            reaper,
            vms: HashMap::new(),
            accepting: true,
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

impl Handler<CreateVm> for Supervisor {
    type Result = ResponseActFuture<Self, Result<CreateRes, ApiError>>;

    fn handle(&mut self, msg: CreateVm, ctx: &mut Self::Context) -> Self::Result {
        if !self.accepting {
            return Box::pin(fut::ready(Err(ApiError::Unavailable(
                "the manager is shutting down".into(),
            ))));
        }
        let max = self.config.max_vms as usize;
        if max > 0 && self.vms.len() >= max {
            return Box::pin(fut::ready(Err(ApiError::ResourceExhausted(format!(
                "VM limit reached: {} VMs exist and MANAGER_MAX_VMS is {max}",
                self.vms.len()
            )))));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let config = self.config.clone();
        let info = CvmInfoRes {
            id: id.clone(),
            ovmf_version: config.qemu_ovmf_version.clone(),
            cpu_num: i32::try_from(config.qemu_smp_count).unwrap_or(i32::MAX),
            cpu_type: config.qemu_cpu.to_string(),
            kernel_cmd: kernel_cmdline(&config, &msg.0.aa_kbs_params),
            eos_version: config.eos_version.clone(),
        };
        let services = Services {
            ports: self.ports.clone(),
            reaper: self.reaper.clone(),
            supervisor: ctx.address().recipient(),
        };
        let addr = CvmActor::new(id.clone(), config, msg.0, services).start();
        self.vms.insert(
            id.clone(),
            VmEntry {
                addr: addr.clone(),
                info,
                port: None,
            },
        );
        info!(vm = %id, total = self.vms.len(), "creating VM");
        Box::pin(
            addr.send(Boot)
                .into_actor(self)
                .map(move |result, act, _ctx| {
                    let result = result.map_err(ApiError::from).and_then(|r| r);
                    match result {
                        Ok(booted) => {
                            if let Some(entry) = act.vms.get_mut(&id) {
                                entry.port = Some(booted.port);
                            }
                            Ok(CreateRes {
                                forwarded_port: booted.port.to_string(),
                                cvm_id: id,
                            })
                        }
                        Err(e) => {
                            act.vms.remove(&id);
                            Err(e)
                        }
                    }
                }),
        )
    }
}

impl Handler<RemoveVm> for Supervisor {
    type Result = ResponseFuture<Result<(), ApiError>>;

    fn handle(&mut self, msg: RemoveVm, _ctx: &mut Self::Context) -> Self::Result {
        let Some(entry) = self.vms.get(&msg.0) else {
            let id = msg.0;
            return Box::pin(
                async move { Err(ApiError::NotFound(format!("no VM with id {id:?}"))) },
            );
        };
        let stop = entry.addr.send(Stop { reason: "RemoveVm" });
        Box::pin(async move { stop.await.map_err(ApiError::from).and_then(|r| r) })
    }
}

impl Handler<VmInfo> for Supervisor {
    type Result = Result<CvmInfoRes, ApiError>;

    fn handle(&mut self, msg: VmInfo, _ctx: &mut Self::Context) -> Self::Result {
        self.vms
            .get(&msg.0)
            .map(|entry| entry.info.clone())
            .ok_or_else(|| ApiError::NotFound(format!("no VM with id {:?}", msg.0)))
    }
}

impl Handler<VmGone> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: VmGone, _ctx: &mut Self::Context) {
        if self.vms.remove(&msg.id).is_some() {
            if msg.state == VmState::Failed {
                warn!(vm = %msg.id, total = self.vms.len(), "VM gone after a failure");
            } else {
                info!(vm = %msg.id, total = self.vms.len(), "VM gone");
            }
        }
    }
}

impl Handler<UpdateConfig> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: UpdateConfig, _ctx: &mut Self::Context) {
        self.config = msg.0;
    }
}

impl Handler<ListVms> for Supervisor {
    type Result = Vec<VmSummary>;

    fn handle(&mut self, _: ListVms, _ctx: &mut Self::Context) -> Vec<VmSummary> {
        self.vms
            .values()
            .map(|entry| VmSummary {
                running: entry.port.is_some(),
            })
            .collect()
    }
}

impl Handler<StopAll> for Supervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: StopAll, _ctx: &mut Self::Context) -> Self::Result {
        self.accepting = false;
        let stops: Vec<_> = self
            .vms
            .values()
            .map(|entry| {
                entry.addr.send(Stop {
                    reason: "manager shutdown",
                })
            })
            .collect();
        info!(count = stops.len(), "stopping all VMs");
        Box::pin(async move {
            for result in join_all(stops).await {
                if let Ok(Err(e)) = result {
                    warn!(error = %e, "a VM did not stop cleanly");
                }
            }
        })
    }
}
