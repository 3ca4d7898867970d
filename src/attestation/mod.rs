//! What a VM's hardware attestation report must say, computed from exactly
//! what the manager launched: the SEV-SNP launch digest (OVMF with kernel
//! hashes, or an IGVM file), the per-VM host data that binds the files the
//! guest was given, and the policy document `AttestationPolicy` answers.
//!
//! Everything here is a pure function of its inputs, except that the SNP and
//! IGVM digests read the firmware, kernel and initrd files they are given
//! (the `sev` crate takes paths); the daemon calls them only off its actor
//! threads, through a cache.

pub mod document;
pub mod hostdata;
pub mod igvm;
pub mod snp;
