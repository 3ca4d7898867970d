//! The `PortAllocator`: hands out host ports from the configured range with
//! real reservations. A port is reserved in our books before QEMU binds it
//! and stays reserved until its VM is gone; ports some other process holds
//! are skipped by trying to bind them first.

use std::collections::BTreeSet;
use std::net::{IpAddr, TcpListener};

use actix::prelude::*;
use cocos_core::ports::{PortPool, PortRange};
use tracing::{debug, info};

#[derive(Message)]
#[rtype(result = "Option<u16>")]
pub struct Reserve;

/// Reserve a port a running VM already holds (after a manager restart).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct ReserveExact(pub u16);

#[derive(Message)]
#[rtype(result = "()")]
pub struct Release(pub u16);

#[derive(Message)]
#[rtype(result = "()")]
pub struct SetRange {
    pub range: PortRange,
    pub bind: IpAddr,
}

#[derive(Message)]
#[rtype(result = "PortSnapshot")]
pub struct Snapshot;

#[derive(Debug, Clone, MessageResponse)]
pub struct PortSnapshot {
    pub range: PortRange,
    pub in_use: BTreeSet<u16>,
}

pub struct PortAllocator {
    pool: PortPool,
    bind: IpAddr,
}

impl PortAllocator {
    /// `bind` is the address VMs' forwarded ports bind to.
    pub fn new(range: PortRange, bind: IpAddr) -> PortAllocator {
        PortAllocator {
            pool: PortPool::new(range),
            bind,
        }
    }
}

impl Actor for PortAllocator {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        crate::failfast::essential_stopped("PortAllocator");
    }
}

fn host_has_free(bind: IpAddr, port: u16) -> bool {
    // The listener is closed at once; our books keep the reservation.
    TcpListener::bind((bind, port)).is_ok()
}

impl Handler<Reserve> for PortAllocator {
    type Result = Option<u16>;

    fn handle(&mut self, _: Reserve, _ctx: &mut Self::Context) -> Option<u16> {
        let bind = self.bind;
        let port = self.pool.reserve(|port| host_has_free(bind, port));
        debug!(?port, "port reserved");
        port
    }
}

impl Handler<ReserveExact> for PortAllocator {
    type Result = bool;

    fn handle(&mut self, msg: ReserveExact, _ctx: &mut Self::Context) -> bool {
        self.pool.reserve_exact(msg.0)
    }
}

impl Handler<Release> for PortAllocator {
    type Result = ();

    fn handle(&mut self, msg: Release, _ctx: &mut Self::Context) {
        if !self.pool.release(msg.0) {
            debug!(port = msg.0, "released a port that was not reserved");
        }
    }
}

impl Handler<SetRange> for PortAllocator {
    type Result = ();

    fn handle(&mut self, msg: SetRange, _ctx: &mut Self::Context) {
        if msg.range != self.pool.range() {
            info!(old = %self.pool.range(), new = %msg.range, in_use = self.pool.in_use().len(), "port range changed");
        }
        self.pool.set_range(msg.range);
        self.bind = msg.bind;
    }
}

impl Handler<Snapshot> for PortAllocator {
    type Result = PortSnapshot;

    fn handle(&mut self, _: Snapshot, _ctx: &mut Self::Context) -> PortSnapshot {
        PortSnapshot {
            range: self.pool.range(),
            in_use: self.pool.in_use().clone(),
        }
    }
}
