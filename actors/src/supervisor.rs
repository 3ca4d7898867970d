//! The `Supervisor`: the registry of VMs. It admits creates (the VM limit is
//! checked and the VM registered in one step, so concurrent creates cannot
//! overshoot it), starts one `CvmActor` per VM, re-adopts the VMs a previous
//! manager left running, and routes requests. It never waits on a VM
//! itself: a slow stop of one VM blocks nothing else.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use cocos_core::attestation::document::{AttestationState, DocumentInputs};
use cocos_core::config::Config;
use cocos_core::guest::ValidatedCreate;
use cocos_core::lifecycle::StopReason;
use cocos_core::proto::{CreateRes, CvmInfoRes};
use cocos_core::qemu::kernel_cmdline;
use cocos_core::record::LaunchInfo;
use futures::future::join_all;
use nix::sys::signal::Signal;
use tracing::{debug, error, info, warn};

use crate::attest::Measurer;
use crate::cvm::{Adopt, Boot, CvmActor, Services, Stop, VmGone, VmState};
use crate::error::ApiError;
use crate::ports::PortAllocator;
use crate::process::{identify, pidfd_exited, pidfd_open, pidfd_signal};
use crate::reaper::ZombieReaper;
use crate::records::{self, Found};

#[derive(Message)]
#[rtype(result = "Result<CreateRes, ApiError>")]
pub struct CreateVm(
    pub ValidatedCreate,
    /// The request's span: the parent of the launch's spans.
    pub tracing::Span,
);

#[derive(Message)]
#[rtype(result = "Result<(), ApiError>")]
pub struct RemoveVm(pub String);

#[derive(Message)]
#[rtype(result = "Result<CvmInfoRes, ApiError>")]
pub struct VmInfo(pub String);

/// A new configuration (and attestation inputs) for VMs created from now on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UpdateConfig(pub Arc<Config>, pub Arc<DocumentInputs>);

/// The attestation policy document of one VM (JSON text).
#[derive(Message)]
#[rtype(result = "Result<String, ApiError>")]
pub struct AttestationPolicy(pub String);

/// Find the VMs a previous manager left and take them over; answers with
/// how many were re-adopted.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Readopt;

/// Refuse new work; stop every VM when `stop_vms`, else leave them running
/// for the next manager. Answers when done.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown {
    pub stop_vms: bool,
}

#[derive(Message)]
#[rtype(result = "Vec<VmSummary>")]
pub struct ListVms;

#[derive(Debug, Clone)]
pub struct VmSummary {
    pub running: bool,
    pub failed: bool,
}

struct VmEntry {
    addr: Addr<CvmActor>,
    info: LaunchInfo,
    /// Known once the VM has booted (or from its record).
    attestation: Option<AttestationState>,
    port: Option<u16>,
    /// Gave up after its restart budget; holds nothing, kept so it shows.
    failed: bool,
}

pub struct Supervisor {
    config: Arc<Config>,
    doc_inputs: Arc<DocumentInputs>,
    ports: Addr<PortAllocator>,
    reaper: Addr<ZombieReaper>,
    measurer: Addr<Measurer>,
    vms: HashMap<String, VmEntry>,
    /// Entries that are failed tombstones. They count against the limit
    /// until removed or pruned after `MANAGER_FAILED_VM_RETENTION`.
    failed: usize,
    accepting: bool,
}

impl Supervisor {
    pub fn new(
        config: Arc<Config>,
        doc_inputs: Arc<DocumentInputs>,
        ports: Addr<PortAllocator>,
        reaper: Addr<ZombieReaper>,
        measurer: Addr<Measurer>,
    ) -> Supervisor {
        Supervisor {
            config,
            doc_inputs,
            ports,
            reaper,
            measurer,
            vms: HashMap::new(),
            failed: 0,
            accepting: true,
        }
    }

    fn services(&self, ctx: &mut Context<Self>) -> Services {
        Services {
            ports: self.ports.clone(),
            reaper: self.reaper.clone(),
            measurer: self.measurer.clone(),
            supervisor: ctx.address().recipient(),
        }
    }

    /// VMs that count toward `MANAGER_MAX_VMS`: all listed ones, failed
    /// tombstones included until they are pruned.
    fn live_count(&self) -> usize {
        self.vms.len()
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        crate::failfast::essential_stopped("Supervisor");
    }
}

/// The watchdog's round trip: answered as soon as the mailbox gets to it,
/// so a wedged supervisor stops the systemd watchdog pings.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ping;

impl Handler<Ping> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Ping, _ctx: &mut Self::Context) {}
}

/// Test hook (feature `test-hooks` only): a panic in every `CvmActor`.
#[cfg(feature = "test-hooks")]
impl Handler<crate::testhooks::PanicVms> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: crate::testhooks::PanicVms, _ctx: &mut Self::Context) {
        for entry in self.vms.values() {
            entry.addr.do_send(crate::testhooks::Panic("CvmActor"));
        }
    }
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
        let live = self.live_count();
        if max > 0 && live >= max {
            return Box::pin(fut::ready(Err(ApiError::ResourceExhausted(format!(
                "VM limit reached: {live} VMs exist and MANAGER_MAX_VMS is {max}"
            )))));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let config = self.config.clone();
        let info = LaunchInfo {
            ovmf_version: config.qemu_ovmf_version.clone(),
            cpu_num: i32::try_from(config.qemu_smp_count).unwrap_or(i32::MAX),
            cpu_type: config.qemu_cpu.to_string(),
            kernel_cmd: kernel_cmdline(&config, &msg.0.aa_kbs_params),
            eos_version: config.eos_version.clone(),
        };
        let services = self.services(ctx);
        let addr = CvmActor::new(
            id.clone(),
            config,
            info.clone(),
            self.doc_inputs.clone(),
            services,
        )
        .start();
        self.vms.insert(
            id.clone(),
            VmEntry {
                addr: addr.clone(),
                info,
                attestation: None,
                port: None,
                failed: false,
            },
        );
        info!(vm = %id, total = self.vms.len(), "creating VM");
        let boot = Boot(msg.0, msg.1);
        Box::pin(
            addr.send(boot)
                .into_actor(self)
                .map(move |result, act, _ctx| {
                    match result.map_err(ApiError::from).and_then(|r| r) {
                        Ok(booted) => {
                            if let Some(entry) = act.vms.get_mut(&id) {
                                entry.port = Some(booted.port);
                                entry.attestation = Some(booted.attestation);
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
        let id = msg.0;
        let Some(entry) = self.vms.get(&id) else {
            return Box::pin(
                async move { Err(ApiError::NotFound(format!("no VM with id {id:?}"))) },
            );
        };
        if entry.failed {
            // It holds nothing any more; removing it only forgets it.
            self.vms.remove(&id);
            self.failed = self.failed.saturating_sub(1);
            info!(vm = %id, "failed VM removed from the list");
            return Box::pin(async { Ok(()) });
        }
        let stop = entry.addr.send(Stop {
            reason: StopReason::Remove,
        });
        Box::pin(async move { stop.await.map_err(ApiError::from).and_then(|r| r) })
    }
}

impl Handler<VmInfo> for Supervisor {
    type Result = Result<CvmInfoRes, ApiError>;

    fn handle(&mut self, msg: VmInfo, _ctx: &mut Self::Context) -> Self::Result {
        let entry = self
            .vms
            .get(&msg.0)
            .ok_or_else(|| ApiError::NotFound(format!("no VM with id {:?}", msg.0)))?;
        let info = &entry.info;
        debug!(vm = %msg.0, usage = %crate::cgroups::usage_text(&msg.0), "CVMInfo");
        Ok(CvmInfoRes {
            id: msg.0,
            ovmf_version: info.ovmf_version.clone(),
            cpu_num: info.cpu_num,
            cpu_type: info.cpu_type.clone(),
            kernel_cmd: info.kernel_cmd.clone(),
            eos_version: info.eos_version.clone(),
        })
    }
}

impl Handler<VmGone> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: VmGone, ctx: &mut Self::Context) {
        if msg.keep_listed {
            if let Some(entry) = self.vms.get_mut(&msg.id) {
                if !entry.failed {
                    entry.failed = true;
                    self.failed += 1;
                }
                entry.port = None;
            }
            let retention = self.config.failed_vm_retention;
            warn!(vm = %msg.id, retention = ?retention, "VM marked failed; listed until removed or the retention time passes");
            let id = msg.id;
            ctx.run_later(retention, move |act, _ctx| {
                if act.vms.get(&id).is_some_and(|e| e.failed) {
                    act.vms.remove(&id);
                    act.failed = act.failed.saturating_sub(1);
                    info!(vm = %id, "failed VM forgotten after MANAGER_FAILED_VM_RETENTION");
                }
            });
        } else if self.vms.remove(&msg.id).is_some() {
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
        self.doc_inputs = msg.1;
    }
}

impl Handler<AttestationPolicy> for Supervisor {
    type Result = Result<String, ApiError>;

    /// Answered from what was fixed when the VM was created: the same
    /// document for the VM's whole life, across manager restarts.
    fn handle(&mut self, msg: AttestationPolicy, _ctx: &mut Self::Context) -> Self::Result {
        let entry = self
            .vms
            .get(&msg.0)
            .ok_or_else(|| ApiError::NotFound(format!("no VM with id {:?}", msg.0)))?;
        let Some(state) = &entry.attestation else {
            return Err(ApiError::FailedPrecondition(format!(
                "VM {} has no attestation state yet: it is still being created",
                msg.0
            )));
        };
        match (&state.document, &state.unavailable) {
            (Some(document), _) => Ok(document.clone()),
            (None, Some(reason)) => Err(ApiError::FailedPrecondition(format!(
                "VM {}: {reason}",
                msg.0
            ))),
            (None, None) => Err(ApiError::FailedPrecondition(format!(
                "VM {} was created by a manager that kept no attestation state for it",
                msg.0
            ))),
        }
    }
}

impl Handler<ListVms> for Supervisor {
    type Result = Vec<VmSummary>;

    fn handle(&mut self, _: ListVms, _ctx: &mut Self::Context) -> Vec<VmSummary> {
        self.vms
            .values()
            .map(|entry| VmSummary {
                running: entry.port.is_some(),
                failed: entry.failed,
            })
            .collect()
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Shutdown, _ctx: &mut Self::Context) -> Self::Result {
        self.accepting = false;
        if !msg.stop_vms {
            info!(
                count = self.live_count(),
                "leaving VMs running for the next manager to re-adopt"
            );
            return Box::pin(async {});
        }
        let stops: Vec<_> = self
            .vms
            .values()
            .filter(|entry| !entry.failed)
            .map(|entry| {
                entry.addr.send(Stop {
                    reason: StopReason::Shutdown,
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

impl Handler<Readopt> for Supervisor {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, _: Readopt, ctx: &mut Self::Context) -> Self::Result {
        let mut adoptions = Vec::new();
        let mut orphans = Vec::new();
        let mut known = HashMap::new();
        for found in records::scan(&self.config) {
            match found {
                Found::Record(record) => {
                    let id = record.id.clone();
                    known.insert(
                        id.clone(),
                        Recorded {
                            qemu: (record.pid, record.start_time),
                            swtpm: record.swtpm.as_ref().map(|s| (s.pid, s.start_time)),
                        },
                    );
                    let addr =
                        CvmActor::from_record(&record, self.config.clone(), self.services(ctx))
                            .start();
                    self.vms.insert(
                        id.clone(),
                        VmEntry {
                            addr: addr.clone(),
                            info: record.info.clone(),
                            attestation: record.attestation.clone(),
                            port: Some(record.port),
                            failed: false,
                        },
                    );
                    adoptions.push(async move { (id, addr.send(Adopt(record)).await) });
                }
                Found::NoRecord { folder, dir } => orphans.push((folder, dir)),
                Found::Corrupt { folder, error } => {
                    error!(vm = %folder, %error, "unreadable VM record moved to <state_dir>/corrupt; its folder is left for inspection");
                }
            }
        }
        let sweep = join_all(
            orphans
                .into_iter()
                .map(|(folder, dir)| sweep_unfinished(folder, dir)),
        );
        let vms_dir = self.config.state_dir.join("vms");
        Box::pin(
            async move {
                // First the processes no record accounts for (a restart the
                // last manager spawned but never recorded, a corrupt
                // record's QEMU): nobody could supervise them.
                kill_strays(vms_dir, known).await;
                sweep.await;
                join_all(adoptions).await
            }
            .into_actor(self)
            .map(|results, act, _ctx| {
                let mut adopted = 0;
                for (id, result) in results {
                    match result {
                        Ok(Ok(_)) => adopted += 1,
                        _ => {
                            act.vms.remove(&id);
                        }
                    }
                }
                info!(adopted, "re-adoption done");
                adopted
            }),
        )
    }
}

/// What a record says of a VM's processes: (pid, start time).
struct Recorded {
    qemu: (i32, u64),
    swtpm: Option<(i32, u64)>,
}

/// Kills every QEMU (`-name cocos-<id>`) and swtpm under `vms_dir` that no
/// record names with the same pid and start time, and waits (bounded) for
/// each to go.
async fn kill_strays(vms_dir: PathBuf, known: HashMap<String, Recorded>) {
    let dir_text = format!("{}/", vms_dir.to_string_lossy());
    let strays = tokio::task::spawn_blocking(move || {
        let mut strays = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return strays;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Some(identity) = identify(pid) else {
                continue;
            };
            let Some(id) = identity.cmdline.iter().find_map(|a| {
                let rest = a.split(&dir_text).nth(1)?;
                rest.split('/').next().map(str::to_string)
            }) else {
                continue;
            };
            let is_qemu = identity.cmdline.iter().any(|a| a == &format!("cocos-{id}"));
            let is_swtpm = identity
                .exe
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("swtpm"));
            if !is_qemu && !is_swtpm {
                continue;
            }
            let me = (pid, identity.start_time);
            let accounted = known.get(&id).is_some_and(|r| {
                if is_qemu {
                    r.qemu == me
                } else {
                    r.swtpm == Some(me)
                }
            });
            if !accounted {
                strays.push((pid, id, if is_qemu { "QEMU" } else { "swtpm" }));
            }
        }
        strays
    })
    .await
    .unwrap_or_default();
    for (pid, id, what) in strays {
        let Ok(pidfd) = pidfd_open(pid) else { continue };
        warn!(vm = %id, pid, what, "killing a process no VM record accounts for");
        let pidfd = Arc::new(pidfd);
        if pidfd_signal(&pidfd, Signal::SIGKILL).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), pidfd_exited(pidfd)).await;
        }
    }
}

/// A VM folder without a record is a create the previous manager never
/// finished; its folder is removed (any QEMU or swtpm it started was killed
/// by `kill_strays`, which runs first).
async fn sweep_unfinished(folder: String, dir: PathBuf) {
    info!(vm = %folder, "removing the folder of an unfinished create");
    let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    if let Err(e) = removed {
        warn!(vm = %folder, error = %e, "cannot remove the folder");
    }
}
