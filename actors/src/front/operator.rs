//! `cocos.manager.v1.Operator`, the operator's extension service served
//! next to the Cocos-compatible one: the list of VMs, one VM in detail, a
//! stream of lifecycle events and a VM's logs. Like the rest of the front
//! it only turns requests into messages for the supervisor (each with a
//! deadline); the streams end when the manager shuts down.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::Addr;
use cocos_core::events;
use cocos_core::operator_proto::operator_server::Operator;
use cocos_core::operator_proto::{
    EventKind, GetVmRequest, GetVmResponse, ListVmsRequest, ListVmsResponse, LogLine, LogSource,
    StreamLogsRequest, VmEvent, WatchEventsRequest,
};
use futures::Stream;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::front::grpc::{ask, Deadline, READ_FATE};
use crate::front::logs::{stopped, LogStream, MAX_TAIL_LINES};
use crate::supervisor::{GetVm, ListVms, LogFiles, Supervisor, Watch, WatchStart};

/// Longest VM id accepted (ids are UUIDs).
const MAX_ID_LEN: usize = 128;

pub struct OperatorApi {
    pub supervisor: Addr<Supervisor>,
    /// `MANAGER_GRPC_TIMEOUT`.
    pub timeout: Duration,
    /// Set when the manager shuts down: open streams end.
    pub stop: watch::Receiver<bool>,
}

fn check_id(id: &str, empty_ok: bool) -> Result<(), Status> {
    if id.is_empty() && !empty_ok {
        return Err(Status::invalid_argument("id: must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "id: {} bytes, at most {MAX_ID_LEN} are accepted",
            id.len()
        )));
    }
    Ok(())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<VmEvent, Status>> + Send>>;
type LogLineStream = Pin<Box<dyn Stream<Item = Result<LogLine, Status>> + Send>>;

/// A watch: the snapshot's events, then live ones after the snapshot (of
/// one VM, or all), a LAGGED marker when this watcher fell behind.
struct Watcher {
    queued: VecDeque<VmEvent>,
    events: broadcast::Receiver<Arc<VmEvent>>,
    after: u64,
    only: Option<String>,
    stop: watch::Receiver<bool>,
    /// The one watched VM was removed: nothing more can come.
    ended: bool,
}

impl Watcher {
    async fn next(&mut self) -> Option<VmEvent> {
        if let Some(event) = self.queued.pop_front() {
            return Some(event);
        }
        if self.ended || *self.stop.borrow() {
            return None;
        }
        loop {
            let received = tokio::select! {
                received = self.events.recv() => received,
                _ = stopped(&mut self.stop) => return None,
            };
            match received {
                Ok(event) => {
                    if event.sequence <= self.after {
                        continue;
                    }
                    if let Some(id) = &self.only {
                        if &event.id != id {
                            continue;
                        }
                        if event.kind == EventKind::Removed as i32 {
                            self.ended = true;
                        }
                    }
                    return Some((*event).clone());
                }
                Err(broadcast::error::RecvError::Lagged(lost)) => {
                    return Some(events::lagged(lost, SystemTime::now()));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[tonic::async_trait]
impl Operator for OperatorApi {
    async fn list_vms(
        &self,
        request: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        let deadline = Deadline::of(request.metadata(), self.timeout);
        let views = match tokio::time::timeout(deadline.limit, self.supervisor.send(ListVms)).await
        {
            Ok(Ok(views)) => views,
            Ok(Err(e)) => return Err(ApiError::from(e).into()),
            Err(_) => return Err(deadline.exceeded("ListVms", READ_FATE).into()),
        };
        let now = SystemTime::now();
        Ok(Response::new(ListVmsResponse {
            vms: views.iter().map(|v| v.to_wire(now)).collect(),
        }))
    }

    async fn get_vm(
        &self,
        request: Request<GetVmRequest>,
    ) -> Result<Response<GetVmResponse>, Status> {
        let deadline = Deadline::of(request.metadata(), self.timeout);
        let id = request.into_inner().id;
        check_id(&id, false)?;
        let detail = ask(
            &self.supervisor,
            GetVm(id),
            deadline,
            "GetVm",
            READ_FATE,
            false,
        )
        .await?;
        let described = detail.described.as_ref();
        Ok(Response::new(GetVmResponse {
            vm: Some(detail.view.to_wire(SystemTime::now())),
            launch: Some(events::launch_config(
                &detail.info,
                described.and_then(|d| d.launch.as_ref()),
                described.and_then(|d| d.attestation.as_ref()),
            )),
            command_line: described.map(|d| d.argv.clone()).unwrap_or_default(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let deadline = Deadline::of(request.metadata(), self.timeout);
        let id = request.into_inner().id;
        check_id(&id, true)?;
        let only = (!id.is_empty()).then_some(id);
        let WatchStart {
            snapshot,
            sequence,
            events,
        } = ask(
            &self.supervisor,
            Watch(only.clone()),
            deadline,
            "WatchEvents",
            READ_FATE,
            false,
        )
        .await?;
        let watcher = Watcher {
            queued: snapshot.into(),
            events,
            after: sequence,
            only,
            stop: self.stop.clone(),
            ended: false,
        };
        let stream = futures::stream::unfold(watcher, |mut watcher| async move {
            watcher.next().await.map(|event| (Ok(event), watcher))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type StreamLogsStream = LogLineStream;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<LogLineStream>, Status> {
        let deadline = Deadline::of(request.metadata(), self.timeout);
        let req = request.into_inner();
        check_id(&req.id, false)?;
        let source = LogSource::try_from(req.source).map_err(|_| {
            Status::invalid_argument(format!(
                "source: {} is not a log source (0 console, 1 QEMU)",
                req.source
            ))
        })?;
        if req.tail_lines > MAX_TAIL_LINES {
            return Err(Status::invalid_argument(format!(
                "tail_lines: {} is more than the {MAX_TAIL_LINES} lines a request may ask for",
                req.tail_lines
            )));
        }
        let files = ask(
            &self.supervisor,
            LogFiles(req.id.clone()),
            deadline,
            "StreamLogs",
            READ_FATE,
            false,
        )
        .await?;
        let path = match source {
            LogSource::Console => files.console,
            LogSource::Qemu => files.qemu,
        };
        let lines = LogStream {
            id: req.id,
            path,
            source,
            tail: req.tail_lines,
            follow: req.follow,
            supervisor: self.supervisor.clone(),
            events: files.events,
            stop: self.stop.clone(),
        }
        .start();
        let stream = futures::stream::unfold(lines, |mut lines| async move {
            lines.recv().await.map(|line| (line, lines))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, id: &str, kind: EventKind) -> Arc<VmEvent> {
        Arc::new(VmEvent {
            sequence,
            id: id.into(),
            kind: kind as i32,
            ..Default::default()
        })
    }

    fn watcher(
        only: Option<&str>,
        after: u64,
        capacity: usize,
    ) -> (
        Watcher,
        broadcast::Sender<Arc<VmEvent>>,
        watch::Sender<bool>,
    ) {
        let (tx, rx) = broadcast::channel(capacity);
        let (stop_tx, stop) = watch::channel(false);
        let snapshot = vec![VmEvent {
            sequence: after,
            kind: EventKind::Synced as i32,
            ..Default::default()
        }];
        (
            Watcher {
                queued: snapshot.into(),
                events: rx,
                after,
                only: only.map(str::to_string),
                stop,
                ended: false,
            },
            tx,
            stop_tx,
        )
    }

    #[tokio::test]
    async fn snapshot_first_then_newer_events_only() {
        let (mut w, tx, _stop) = watcher(None, 5, 16);
        tx.send(event(5, "a", EventKind::Running)).expect("send");
        tx.send(event(6, "a", EventKind::Exited)).expect("send");
        assert_eq!(w.next().await.map(|e| e.kind()), Some(EventKind::Synced));
        let next = w.next().await.expect("event");
        assert_eq!((next.sequence, next.kind()), (6, EventKind::Exited));
    }

    #[tokio::test]
    async fn one_vm_only_and_its_removal_ends_the_watch() {
        let (mut w, tx, _stop) = watcher(Some("a"), 0, 16);
        w.next().await.expect("synced");
        tx.send(event(1, "b", EventKind::Created)).expect("send");
        tx.send(event(2, "a", EventKind::Removed)).expect("send");
        tx.send(event(3, "a", EventKind::Created)).expect("send");
        let next = w.next().await.expect("event");
        assert_eq!((next.id.as_str(), next.kind()), ("a", EventKind::Removed));
        assert!(w.next().await.is_none());
    }

    #[tokio::test]
    async fn a_slow_watcher_is_told_how_many_it_lost() {
        let (mut w, tx, _stop) = watcher(None, 0, 4);
        w.next().await.expect("synced");
        for n in 1..=10 {
            tx.send(event(n, "a", EventKind::Running)).expect("send");
        }
        let lagged = w.next().await.expect("marker");
        assert_eq!(lagged.kind(), EventKind::Lagged);
        assert_eq!(lagged.lagged, 6);
        assert_eq!(w.next().await.expect("event").sequence, 7);
    }

    #[tokio::test]
    async fn shutdown_ends_the_watch() {
        let (mut w, _tx, stop) = watcher(None, 0, 4);
        w.next().await.expect("synced");
        stop.send(true).expect("stop");
        assert!(w.next().await.is_none());
    }

    #[test]
    fn ids_are_checked() {
        assert_eq!(
            check_id("", false).map_err(|s| s.code()),
            Err(tonic::Code::InvalidArgument)
        );
        assert!(check_id("", true).is_ok());
        assert_eq!(
            check_id(&"x".repeat(200), true).map_err(|s| s.code()),
            Err(tonic::Code::InvalidArgument)
        );
    }
}
