//! Per-VM SEV-SNP host data: 32 bytes the host fixes at launch and the
//! hardware copies into every attestation report. The original put a
//! constant placeholder there; we bind the files the VM was given, so the
//! guest (and any verifier holding the same files) can recompute it.
//!
//! Version 1: SHA-256 over the concatenation, for each file the guest
//! receives, in byte order of its name, of
//! `name ‖ 0x00 ‖ len(content) as u64 little-endian ‖ content`, where the
//! names are `certs/<file name>` for the certs share and `env/environment`
//! for the env file (the guest sees them at `/etc/certs/<file name>` and
//! `/etc/cocos/environment`).

use sha2::{Digest, Sha256};

use crate::guest::ValidatedCreate;

/// The version of the recipe above; a verifier must use the same one.
pub const HOST_DATA_VERSION: u32 = 1;

/// The digest over named files, in the recipe's order whatever order they
/// come in.
pub fn digest<'a>(files: impl IntoIterator<Item = (String, &'a [u8])>) -> [u8; 32] {
    let mut files: Vec<(String, &[u8])> = files.into_iter().collect();
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut hash = Sha256::new();
    for (name, content) in files {
        hash.update(name.as_bytes());
        hash.update([0u8]);
        hash.update((content.len() as u64).to_le_bytes());
        hash.update(content);
    }
    hash.finalize().into()
}

/// The files a VM created from `create` with id `id` receives, named as the
/// recipe names them.
pub fn guest_files(create: &ValidatedCreate, id: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = create
        .certs
        .iter()
        .map(|cert| (format!("certs/{}", cert.name), cert.content.clone()))
        .collect();
    files.push((
        "env/environment".to_string(),
        create.environment_file(id).into_bytes(),
    ));
    files
}

/// The host data of the VM `id` created from `create`.
pub fn for_vm(create: &ValidatedCreate, id: &str) -> [u8; 32] {
    let files = guest_files(create, id);
    digest(files.iter().map(|(n, c)| (n.clone(), c.as_slice())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::validate_create;
    use crate::proto::CreateReq;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    // Known answers from Python's hashlib, an independent implementation:
    //   python3 -c 'import hashlib,struct
    //   h=hashlib.sha256()
    //   for n,c in sorted([(b"env/environment",b"A=1\n"),(b"certs/ca.pem",b"CA")]):
    //       h.update(n+b"\0"+struct.pack("<Q",len(c))+c)
    //   print(h.hexdigest())'
    #[test]
    fn digest_matches_an_independent_computation() {
        let files = [
            ("env/environment".to_string(), b"A=1\n".as_slice()),
            ("certs/ca.pem".to_string(), b"CA".as_slice()),
        ];
        assert_eq!(
            hex(&digest(files)),
            "40bf7cb6e1e9430c24d6eeb4fd48da2c09a40737a54a8c1deaffb6de039b6b60"
        );
    }

    // python3 -c 'import hashlib; print(hashlib.sha256(b"").hexdigest())'
    #[test]
    fn no_files_is_the_empty_digest() {
        assert_eq!(
            hex(&digest(Vec::<(String, &[u8])>::new())),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    // 300 bytes: the length has two non-zero bytes (0x2c, 0x01).
    //   python3 -c 'import hashlib,struct
    //   c=bytes(range(256))+bytes(44); n=b"certs/key.pem"
    //   print(hashlib.sha256(n+b"\0"+struct.pack("<Q",len(c))+c).hexdigest())'
    #[test]
    fn length_is_eight_bytes_little_endian() {
        let mut content: Vec<u8> = (0..=255u8).collect();
        content.extend([0u8; 44]);
        assert_eq!(
            hex(&digest([("certs/key.pem".to_string(), content.as_slice())])),
            "de5a304f5db07cfc2c14f8e289ed8c57613632d41c4ae41b942de90ed2c11424"
        );
    }

    #[test]
    fn order_of_input_does_not_matter_and_content_does() {
        let a = [
            ("certs/a".to_string(), b"1".as_slice()),
            ("certs/b".to_string(), b"2".as_slice()),
        ];
        let b = [
            ("certs/b".to_string(), b"2".as_slice()),
            ("certs/a".to_string(), b"1".as_slice()),
        ];
        assert_eq!(digest(a.clone()), digest(b));
        let c = [
            ("certs/a".to_string(), b"1".as_slice()),
            ("certs/b".to_string(), b"3".as_slice()),
        ];
        assert_ne!(digest(a), digest(c));
    }

    #[test]
    fn a_vm_binds_its_own_id_and_files() {
        let req = CreateReq {
            agent_log_level: "info".into(),
            agent_cvm_server_ca_cert: b"CA PEM".to_vec(),
            ..Default::default()
        };
        let create = validate_create(&req).expect("valid");
        let files = guest_files(&create, "id-1");
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"certs/ca.pem"), "{names:?}");
        assert!(names.contains(&"env/environment"), "{names:?}");
        assert_ne!(for_vm(&create, "id-1"), for_vm(&create, "id-2"));
        assert_eq!(for_vm(&create, "id-1"), for_vm(&create, "id-1"));
    }
}
