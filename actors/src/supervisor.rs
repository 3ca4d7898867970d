//! The `Supervisor`: the registry of VMs. It admits creates (the VM limit is
//! checked and the VM registered in one step, so concurrent creates cannot
//! overshoot it), starts one `CvmActor` per VM, re-adopts the VMs a previous
//! manager left running, and routes requests. It never waits on a VM
//! itself: a slow stop of one VM blocks nothing else.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use cocos_core::attestation::document::{AttestationState, DocumentInputs};
use cocos_core::config::Config;
use cocos_core::events::{self, launch_kind, EventKind, VmFacts, VmView};
use cocos_core::guest::ValidatedCreate;
use cocos_core::lifecycle::StopReason;
use cocos_core::operator_proto as wire;
use cocos_core::proto::{CreateRes, CvmInfoRes};
use cocos_core::qemu::{kernel_cmdline, VmPaths};
use cocos_core::record::LaunchInfo;
use futures::future::join_all;
use nix::sys::signal::Signal;
use tokio::sync::broadcast;
use tracing::{debug, error, info, warn};

use crate::attest::Measurer;
use crate::cvm::{
    Adopt, Boot, CvmActor, Describe, Described, Services, Stop, VmGone, VmReport, VmState,
};
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

/// Every VM as the operator's service shows it.
#[derive(Message)]
#[rtype(result = "Vec<VmView>")]
pub struct ListVms;

/// One VM in detail (`GetVm`).
#[derive(Message)]
#[rtype(result = "Result<VmDetail, ApiError>")]
pub struct GetVm(pub String);

#[derive(Debug, Clone)]
pub struct VmDetail {
    pub view: VmView,
    pub info: LaunchInfo,
    /// None once the VM's actor has ended (a failed VM still listed).
    pub described: Option<Described>,
}

/// Starts a watch of lifecycle events, of one VM (`Some(id)`) or all: the
/// current state of each (as CURRENT events, then SYNCED) and a receiver
/// of every event published after that snapshot, taken in one step so a
/// watcher misses nothing in between.
#[derive(Message)]
#[rtype(result = "Result<WatchStart, ApiError>")]
pub struct Watch(pub Option<String>);

pub struct WatchStart {
    pub snapshot: Vec<wire::VmEvent>,
    /// The sequence number of the snapshot; received events numbered at
    /// or below it are already in it.
    pub sequence: u64,
    pub events: broadcast::Receiver<Arc<wire::VmEvent>>,
}

/// Where a VM's logs are, with a subscription to lifecycle events taken in
/// the same step (so a follower sees the VM's removal).
#[derive(Message)]
#[rtype(result = "Result<LogFilesOf, ApiError>")]
pub struct LogFiles(pub String);

pub struct LogFilesOf {
    pub console: PathBuf,
    pub qemu: PathBuf,
    pub events: broadcast::Receiver<Arc<wire::VmEvent>>,
}

/// Whether a VM is listed.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct IsListed(pub String);

/// Published events a watcher may fall behind by before it loses some
/// (and is told how many). Shared by all watchers: memory does not grow
/// with slow ones.
pub const EVENT_BUFFER: usize = 1024;

struct VmEntry {
    addr: Addr<CvmActor>,
    info: LaunchInfo,
    /// Known once the VM has booted (or from its record).
    attestation: Option<AttestationState>,
    port: Option<u16>,
    /// Gave up after its restart budget; holds nothing, kept so it shows.
    failed: bool,
    view: VmView,
    /// Its console log and QEMU log.
    logs: (PathBuf, PathBuf),
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
    /// Lifecycle events for watchers (`WatchEvents`, log followers).
    events: broadcast::Sender<Arc<wire::VmEvent>>,
    /// Number of the last published event.
    sequence: u64,
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
            events: broadcast::channel(EVENT_BUFFER).0,
            sequence: 0,
        }
    }

    fn services(&self, ctx: &mut Context<Self>) -> Services {
        Services {
            ports: self.ports.clone(),
            reaper: self.reaper.clone(),
            measurer: self.measurer.clone(),
            supervisor: ctx.address().recipient(),
            reports: ctx.address().recipient(),
        }
    }

    /// Numbers an event of VM `id` (its entry already updated) and sends
    /// it to every watcher.
    fn publish(&mut self, id: &str, kind: &EventKind) {
        let Some(entry) = self.vms.get(id) else {
            return;
        };
        crate::metrics::vm_event(&entry.view, kind);
        self.sequence += 1;
        let event = entry.view.event(self.sequence, kind, SystemTime::now());
        debug!(vm = %id, event = kind.as_str(), sequence = self.sequence, "VM event");
        // No watcher is not an error.
        let _ = self.events.send(Arc::new(event));
    }

    /// Drops VM `id` from the list, telling watchers it is removed.
    fn forget(&mut self, id: &str) -> bool {
        let Some(entry) = self.vms.get_mut(id) else {
            return false;
        };
        // It holds nothing any more.
        let facts = &mut entry.view.facts;
        if facts.state != VmState::Failed {
            facts.state = VmState::Stopped;
        }
        facts.pid = None;
        facts.port = None;
        facts.started = None;
        self.publish(id, &EventKind::Removed);
        if let Some(entry) = self.vms.remove(id) {
            if entry.failed {
                self.failed = self.failed.saturating_sub(1);
            }
        }
        true
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
        let view = VmView {
            id: id.clone(),
            tee: launch_kind(config.tee_mode()),
            vtpm: config.qemu_vtpm == cocos_core::config::VtpmMode::Swtpm,
            created: SystemTime::now(),
            readopted: false,
            facts: VmFacts::starting(),
        };
        let paths = VmPaths::new(&config, &id);
        let logs = (paths.console_log, paths.qemu_log);
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
                view,
                logs,
            },
        );
        self.publish(&id, &EventKind::Created);
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
                                entry.view.vtpm = booted.attestation.vtpm;
                                entry.view.tee = booted.attestation.launch;
                                entry.attestation = Some(booted.attestation);
                            }
                            Ok(CreateRes {
                                forwarded_port: booted.port.to_string(),
                                cvm_id: id,
                            })
                        }
                        Err(e) => {
                            act.forget(&id);
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
            self.forget(&id);
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
                    act.forget(&id);
                    info!(vm = %id, "failed VM forgotten after MANAGER_FAILED_VM_RETENTION");
                }
            });
        } else if self.forget(&msg.id) {
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
    type Result = Vec<VmView>;

    fn handle(&mut self, _: ListVms, _ctx: &mut Self::Context) -> Vec<VmView> {
        let mut views: Vec<VmView> = self.vms.values().map(|e| e.view.clone()).collect();
        views.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        views
    }
}

impl Handler<GetVm> for Supervisor {
    type Result = ResponseFuture<Result<VmDetail, ApiError>>;

    /// The VM's actor holds what it was launched with (one copy per VM);
    /// asked here, while the listing's facts come from the table.
    fn handle(&mut self, msg: GetVm, _ctx: &mut Self::Context) -> Self::Result {
        let Some(entry) = self.vms.get(&msg.0) else {
            let id = msg.0;
            return Box::pin(
                async move { Err(ApiError::NotFound(format!("no VM with id {id:?}"))) },
            );
        };
        let view = entry.view.clone();
        let info = entry.info.clone();
        let describe = entry.addr.send(Describe);
        Box::pin(async move {
            Ok(VmDetail {
                view,
                info,
                described: describe.await.ok(),
            })
        })
    }
}

impl Handler<Watch> for Supervisor {
    type Result = Result<WatchStart, ApiError>;

    fn handle(&mut self, msg: Watch, _ctx: &mut Self::Context) -> Self::Result {
        if let Some(id) = &msg.0 {
            if !self.vms.contains_key(id) {
                return Err(ApiError::NotFound(format!("no VM with id {id:?}")));
            }
        }
        let now = SystemTime::now();
        let mut views: Vec<&VmView> = self
            .vms
            .values()
            .map(|e| &e.view)
            .filter(|v| msg.0.as_ref().is_none_or(|id| &v.id == id))
            .collect();
        views.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        let mut snapshot: Vec<wire::VmEvent> = views
            .iter()
            .map(|v| v.current(self.sequence, now))
            .collect();
        snapshot.push(events::synced(self.sequence, now));
        Ok(WatchStart {
            snapshot,
            sequence: self.sequence,
            events: self.events.subscribe(),
        })
    }
}

impl Handler<LogFiles> for Supervisor {
    type Result = Result<LogFilesOf, ApiError>;

    fn handle(&mut self, msg: LogFiles, _ctx: &mut Self::Context) -> Self::Result {
        let entry = self
            .vms
            .get(&msg.0)
            .ok_or_else(|| ApiError::NotFound(format!("no VM with id {:?}", msg.0)))?;
        let (console, qemu) = entry.logs.clone();
        Ok(LogFilesOf {
            console,
            qemu,
            events: self.events.subscribe(),
        })
    }
}

impl Handler<IsListed> for Supervisor {
    type Result = bool;

    fn handle(&mut self, msg: IsListed, _ctx: &mut Self::Context) -> bool {
        self.vms.contains_key(&msg.0)
    }
}

impl Handler<VmReport> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: VmReport, _ctx: &mut Self::Context) {
        let Some(entry) = self.vms.get_mut(&msg.id) else {
            return;
        };
        entry.view.facts = msg.facts;
        self.publish(&msg.id, &msg.kind);
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
                    let created = record
                        .created_ms
                        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
                        .unwrap_or_else(SystemTime::now);
                    let view = VmView {
                        id: id.clone(),
                        tee: record
                            .attestation
                            .as_ref()
                            .map(|a| a.launch)
                            .unwrap_or_else(|| launch_kind(self.config.tee_mode())),
                        vtpm: record
                            .attestation
                            .as_ref()
                            .map_or(record.swtpm.is_some(), |a| a.vtpm),
                        created,
                        readopted: true,
                        facts: VmFacts::starting(),
                    };
                    self.vms.insert(
                        id.clone(),
                        VmEntry {
                            addr: addr.clone(),
                            info: record.info.clone(),
                            attestation: record.attestation.clone(),
                            port: Some(record.port),
                            failed: false,
                            view,
                            logs: (
                                record.paths.console_log.clone(),
                                record.paths.qemu_log.clone(),
                            ),
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
                            act.forget(&id);
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
