//! The host-port range and the pool's bookkeeping. Whether a port is really
//! free on the host is asked through a probe the caller supplies, so this
//! stays pure and the allocator actor owns the sockets.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// An inclusive range of host ports, `START-END`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("expected START-END, e.g. 6100-6200")]
    Syntax,
    #[error("ports must be from 1 to 65535")]
    OutOfBounds,
    #[error("START must not be greater than END")]
    Reversed,
}

impl PortRange {
    /// No ports at all (the configuration then falls back to a single port).
    pub const EMPTY: PortRange = PortRange { start: 1, end: 0 };

    pub fn single(port: u16) -> PortRange {
        PortRange {
            start: port,
            end: port,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.start > self.end
    }

    pub fn len(&self) -> usize {
        if self.is_empty() {
            0
        } else {
            usize::from(self.end - self.start) + 1
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        port >= self.start && port <= self.end
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (a, b) = text.trim().split_once('-').ok_or(PortRangeError::Syntax)?;
        let parse = |s: &str| -> Result<u16, PortRangeError> {
            let v: u32 = s.trim().parse().map_err(|_| PortRangeError::Syntax)?;
            if v == 0 || v > 65535 {
                return Err(PortRangeError::OutOfBounds);
            }
            Ok(v as u16)
        };
        let (start, end) = (parse(a)?, parse(b)?);
        if start > end {
            return Err(PortRangeError::Reversed);
        }
        Ok(PortRange { start, end })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            Ok(())
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Which ports are reserved. Ports are handed out round-robin from just
/// after the last one given, so a port a VM just released is the last to be
/// reused (old clients may still be pointed at it).
#[derive(Debug, Clone)]
pub struct PortPool {
    range: PortRange,
    in_use: BTreeSet<u16>,
    next: u16,
}

impl PortPool {
    pub fn new(range: PortRange) -> PortPool {
        PortPool {
            range,
            in_use: BTreeSet::new(),
            next: range.start,
        }
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Changes the range. Reserved ports stay reserved even outside it, until
    /// their VM releases them.
    pub fn set_range(&mut self, range: PortRange) {
        self.range = range;
        if !range.contains(self.next) {
            self.next = range.start;
        }
    }

    pub fn in_use(&self) -> &BTreeSet<u16> {
        &self.in_use
    }

    pub fn is_reserved(&self, port: u16) -> bool {
        self.in_use.contains(&port)
    }

    /// Ports of the range that are not reserved.
    pub fn free_count(&self) -> usize {
        let range = self.range;
        self.range.len() - self.in_use.iter().filter(|p| range.contains(**p)).count()
    }

    /// Reserves the first port, going round from the cursor, that is not
    /// reserved and that `probe` says the host has free.
    pub fn reserve(&mut self, mut probe: impl FnMut(u16) -> bool) -> Option<u16> {
        if self.range.is_empty() {
            return None;
        }
        let len = self.range.len();
        let offset = usize::from(self.next.saturating_sub(self.range.start));
        for step in 0..len {
            let port = self.range.start + ((offset + step) % len) as u16;
            if self.in_use.contains(&port) || !probe(port) {
                continue;
            }
            self.in_use.insert(port);
            self.next = if port >= self.range.end {
                self.range.start
            } else {
                port + 1
            };
            return Some(port);
        }
        None
    }

    /// Marks a specific port reserved (a VM that already holds it).
    pub fn reserve_exact(&mut self, port: u16) -> bool {
        self.in_use.insert(port)
    }

    /// Returns a port to the pool; false when it was not reserved.
    pub fn release(&mut self, port: u16) -> bool {
        self.in_use.remove(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges() {
        assert_eq!(
            "6100-6200".parse(),
            Ok(PortRange {
                start: 6100,
                end: 6200
            })
        );
        assert_eq!(
            " 1-65535 ".parse(),
            Ok(PortRange {
                start: 1,
                end: 65535
            })
        );
        assert_eq!("7000-7000".parse::<PortRange>().map(|r| r.len()), Ok(1));
        assert_eq!(
            "6200-6100".parse::<PortRange>(),
            Err(PortRangeError::Reversed)
        );
        assert_eq!(
            "0-10".parse::<PortRange>(),
            Err(PortRangeError::OutOfBounds)
        );
        assert_eq!(
            "1-65536".parse::<PortRange>(),
            Err(PortRangeError::OutOfBounds)
        );
        for bad in ["6100", "a-b", "6100-", "-6200", "6100:6200", ""] {
            assert_eq!(
                bad.parse::<PortRange>(),
                Err(PortRangeError::Syntax),
                "{bad}"
            );
        }
        assert_eq!(
            PortRange {
                start: 6100,
                end: 6200
            }
            .to_string(),
            "6100-6200"
        );
        assert!(PortRange::EMPTY.is_empty());
        assert_eq!(PortRange::EMPTY.len(), 0);
    }

    #[test]
    fn never_hands_out_a_port_twice() {
        let mut pool = PortPool::new("6100-6102".parse().expect("range"));
        let a = pool.reserve(|_| true);
        let b = pool.reserve(|_| true);
        let c = pool.reserve(|_| true);
        assert_eq!((a, b, c), (Some(6100), Some(6101), Some(6102)));
        assert_eq!(pool.reserve(|_| true), None);
        assert_eq!(pool.free_count(), 0);
        assert!(pool.release(6101));
        assert!(!pool.release(6101));
        assert_eq!(pool.reserve(|_| true), Some(6101));
    }

    #[test]
    fn skips_ports_the_host_holds() {
        let mut pool = PortPool::new("6100-6104".parse().expect("range"));
        let taken = [6100, 6101, 6103];
        assert_eq!(pool.reserve(|p| !taken.contains(&p)), Some(6102));
        assert_eq!(pool.reserve(|p| !taken.contains(&p)), Some(6104));
        assert_eq!(pool.reserve(|p| !taken.contains(&p)), None);
    }

    #[test]
    fn round_robin_reuses_released_ports_last() {
        let mut pool = PortPool::new("6100-6102".parse().expect("range"));
        assert_eq!(pool.reserve(|_| true), Some(6100));
        assert!(pool.release(6100));
        assert_eq!(pool.reserve(|_| true), Some(6101));
        assert_eq!(pool.reserve(|_| true), Some(6102));
        assert_eq!(pool.reserve(|_| true), Some(6100));
    }

    #[test]
    fn shrinking_keeps_reservations() {
        let mut pool = PortPool::new("6100-6110".parse().expect("range"));
        for _ in 0..5 {
            pool.reserve(|_| true);
        }
        pool.set_range("6103-6104".parse().expect("range"));
        assert!(pool.is_reserved(6100));
        assert_eq!(pool.reserve(|_| true), None);
        assert!(pool.release(6103));
        assert_eq!(pool.reserve(|_| true), Some(6103));
        assert!(pool.release(6100));
        assert!(!pool.range().contains(6100));
    }

    #[test]
    fn reserve_exact_marks_held_ports() {
        let mut pool = PortPool::new("6100-6101".parse().expect("range"));
        assert!(pool.reserve_exact(6100));
        assert!(!pool.reserve_exact(6100));
        assert_eq!(pool.reserve(|_| true), Some(6101));
    }
}
