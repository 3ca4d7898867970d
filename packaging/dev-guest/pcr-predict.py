#!/usr/bin/env python3
"""Predict sha256 PCR 4 and PCR 9 of an OVMF direct-kernel boot with a vTPM.

Usage: pcr-predict.py --kernel bzImage --initrd rootfs.cpio.gz \\
                      --append "console=ttyS0 quiet" --memory 512M

Prints "4 <hex>" and "9 <hex>" lines (the format of the dev guest's GET /pcrs).

Derived from the TCG event log of the development guest (QEMU 7.2, -machine
q35, Debian OVMF 2022.11 OVMF_CODE.fd, Debian kernel 6.1 with EFI stub) and
checked against the PCRs read in the guest (smoke-test.sh VTPM=1 does so on
every run). What gets measured:

PCR 4  OVMF: EV_EFI_BOOT_SERVICES_APPLICATION = Authenticode SHA-256 of the
       kernel *as QEMU hands it over*: QEMU patches the bzImage setup header
       (cmd_line_ptr=0x20000, type_of_loader=0xb0, heap_end_ptr=0xfe00,
       CAN_USE_HEAP, ramdisk_image, ramdisk_size), so the digest depends on the
       initrd's SIZE (not content) and on the guest RAM below 4 GiB (where the
       initrd is placed); then EV_EFI_ACTION "Calling EFI Application from Boot
       Option"; then the separator (4 zero bytes).
PCR 9  Linux EFI stub: sha256 of the load options = UTF-16LE of
       "<cmdline> initrd=initrd" plus a NUL (OVMF appends " initrd=initrd"
       when an initrd is given), then sha256 of the initrd file content.

Not modelled: a "vga=" in the command line (QEMU writes vid_mode into the
header), QEMU setup_data (-dtb), machines other than q35, no initrd. Other QEMU
or OVMF versions may differ: compare with a real boot before relying on it.
"""
import argparse
import hashlib
import os
import struct
import sys


def authenticode_sha256(d: bytes) -> bytes:
    """PE/COFF Authenticode digest (what OVMF's DxeTpm2MeasureBootLib extends)."""
    pe = struct.unpack_from("<I", d, 0x3C)[0]
    if d[pe:pe + 4] != b"PE\0\0":
        raise ValueError("not a PE image (kernel without EFI stub?)")
    coff = pe + 4
    nsec, = struct.unpack_from("<H", d, coff + 2)
    optsz, = struct.unpack_from("<H", d, coff + 16)
    opt = coff + 20
    magic, = struct.unpack_from("<H", d, opt)
    checksum = opt + 64
    cert_dir = opt + (96 if magic == 0x10B else 112) + 4 * 8  # data directory 4
    hdrsize, = struct.unpack_from("<I", d, opt + 60)
    _, certsz = struct.unpack_from("<II", d, cert_dir)
    h = hashlib.sha256()
    h.update(d[:checksum])
    h.update(d[checksum + 4:cert_dir])
    h.update(d[cert_dir + 8:hdrsize])
    sections = sorted(struct.unpack_from("<II", d, opt + optsz + 40 * i + 16)[::-1] for i in range(nsec))
    done = hdrsize
    for ptr, size in sections:
        if size:
            h.update(d[ptr:ptr + size])
            done = ptr + size
    end = len(d) - certsz
    if end > done:
        h.update(d[done:end])
    return h.digest()


def parse_mem(s: str) -> int:
    s = s.split(",")[0].strip()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s[-1:].upper() in units:
        return int(s[:-1]) * units[s[-1].upper()]
    return int(s) << 20  # QEMU: a bare number is MiB


def extend(pcr: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(pcr + digest).digest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--append", default="")
    ap.add_argument("--memory", default="2048M", help="QEMU -m value (default 2048M)")
    a = ap.parse_args()

    ram = parse_mem(a.memory)
    # q35 (QEMU 7.2): RAM below 4 GiB is all of it up to 0xb0000000, else 2 GiB.
    below_4g = ram if ram < 0xB0000000 else 0x80000000
    acpi_data_size = 0x20000 + 0x8000

    k = bytearray(open(a.kernel, "rb").read())
    if k[0x202:0x206] != b"HdrS":
        raise SystemExit("not a bzImage (no HdrS)")
    isz = os.path.getsize(a.initrd)
    initrd_addr_max, = struct.unpack_from("<I", k, 0x22C)
    initrd_max = min(initrd_addr_max, below_4g - acpi_data_size - 1)
    struct.pack_into("<I", k, 0x228, 0x20000)  # cmd_line_ptr
    k[0x210] = 0xB0  # type_of_loader: QEMU
    struct.pack_into("<H", k, 0x224, 0x20000 - 0x10000 - 0x200)  # heap_end_ptr
    k[0x211] |= 0x80  # loadflags: CAN_USE_HEAP
    struct.pack_into("<II", k, 0x218, (initrd_max - isz) & ~0xFFF, isz)  # ramdisk_image, ramdisk_size

    sep = hashlib.sha256(b"\0" * 4).digest()
    pcr4 = bytes(32)
    for dig in (authenticode_sha256(bytes(k)),
                hashlib.sha256(b"Calling EFI Application from Boot Option").digest(), sep):
        pcr4 = extend(pcr4, dig)

    with open(a.initrd, "rb") as f:
        initrd_digest = hashlib.sha256(f.read()).digest()
    opts = (a.append + " initrd=initrd\0").encode("utf-16le")
    pcr9 = extend(extend(bytes(32), hashlib.sha256(opts).digest()), initrd_digest)

    print("4", pcr4.hex())
    print("9", pcr9.hex())
    return 0


if __name__ == "__main__":
    sys.exit(main())
