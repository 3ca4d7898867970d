#!/usr/bin/env bash
# Boot the development guest under QEMU/TCG the way the manager does and check
# the agent stand-in end to end (health, env, certs, hostdata, pcrs, QMP
# power-down).
#
# Usage: packaging/dev-guest/smoke-test.sh
#        VTPM=1 packaging/dev-guest/smoke-test.sh   with a swtpm vTPM (tpm-crb)
# Env:   CPU=max|EPYC|...        (default max)
#        APPEND="console=ttyS0 quiet"   kernel command line
#        PORT=6150                host port forwarded to guest :7002
#        MEM=512M                 guest RAM (-m MEM,slots=5,maxmem=30G)
#        INITRD=path              (default target/dev-guest/rootfs.cpio.gz)
#        VTPM=1                   attach a fresh swtpm (state made by swtpm_setup
#                                 in the scratch dir); check /pcrs (PCRs 0-7 and
#                                 9 non-zero; 4 and 9 equal to pcr-predict.py)
#                                 and that neither the swtpm process nor its
#                                 socket is left after QEMU exits.
#                                 Without VTPM, /pcrs must answer 404.
#        PCRS_OUT=file            (VTPM=1) also copy the /pcrs body there
#        KEEP=1                   leave the scratch dir (console log) behind
# Needs: qemu-system-x86_64, ovmf, python3, curl; swtpm + swtpm-tools for VTPM=1.
# Never uses KVM.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CPU=${CPU:-max}
APPEND=${APPEND:-console=ttyS0 quiet}
PORT=${PORT:-6150}
MEM=${MEM:-512M}
KERNEL="$ROOT/target/dev-guest/bzImage"
INITRD=${INITRD:-$ROOT/target/dev-guest/rootfs.cpio.gz}
[[ -f "$KERNEL" && -f "$INITRD" ]] || "$HERE/build.sh"

T=$(mktemp -d /tmp/dev-guest-smoke.XXXXXX)
QEMU_PID=""
CONSOLE_PID=""
SWTPM_PID=""
cleanup() {
	[[ -n "$CONSOLE_PID" ]] && kill "$CONSOLE_PID" 2>/dev/null || true
	if [[ -n "$QEMU_PID" ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
		kill "$QEMU_PID" 2>/dev/null || true
		wait "$QEMU_PID" 2>/dev/null || true
	fi
	if [[ -n "$SWTPM_PID" ]] && kill -0 "$SWTPM_PID" 2>/dev/null; then
		kill "$SWTPM_PID" 2>/dev/null || true
		wait "$SWTPM_PID" 2>/dev/null || true
	fi
	if [[ -z "${KEEP:-}" ]]; then rm -rf "$T"; else echo "scratch dir kept: $T"; fi
}
trap cleanup EXIT

fail() { echo "FAIL: $*"; echo "--- console:"; cat "$T/console.log" 2>/dev/null || true; exit 1; }

# --- the two shares ---------------------------------------------------------------
mkdir -p "$T/certs" "$T/env"
cp /usr/share/OVMF/OVMF_VARS.fd "$T/vars.fd"
echo cert >"$T/certs/cert.pem"
echo k >"$T/certs/key.pem"
chmod 600 "$T/certs/key.pem"
# For /hostdata: a text file without a final newline and > 255 bytes (its length
# has two non-zero bytes), a binary file (every byte value, NUL, CR LF, 0xff),
# and two entries that must not count: a subdirectory and a symlink.
python3 - "$T/certs" <<'PY'
import os, sys
d = sys.argv[1]
with open(os.path.join(d, "ca.pem"), "wb") as f:
    f.write(b"-----BEGIN CERTIFICATE-----\n" + b"MIIB" * 80 + b"\n-----END CERTIFICATE-----")
with open(os.path.join(d, "blob.bin"), "wb") as f:
    f.write(bytes(range(256)) * 3 + b"\0\r\n\xff")
os.mkdir(os.path.join(d, "sub"))
with open(os.path.join(d, "sub", "inner.pem"), "wb") as f:
    f.write(b"not counted\n")
os.symlink("cert.pem", os.path.join(d, "link.pem"))
PY
printf 'AGENT_LOG_LEVEL=info\nAGENT_CVM_ID=abc\n' >"$T/env/environment"

# Host-side reference for GET /hostdata (digest v1 of the attestation spec).
host_hostdata() { # CERTS_DIR ENV_FILE -> 64 hex chars
	python3 - "$1" "$2" <<'PY'
import hashlib, os, sys
certs, envf = sys.argv[1], sys.argv[2]
items = []
if os.path.isdir(certs):
    for e in os.scandir(certs):
        if e.is_file(follow_symlinks=False):  # regular, top level, no symlinks
            with open(e.path, "rb") as f:
                items.append((b"certs/" + os.fsencode(e.name), f.read()))
if os.path.isfile(envf) and not os.path.islink(envf):
    with open(envf, "rb") as f:
        items.append((b"env/environment", f.read()))
h = hashlib.sha256()
for name, data in sorted(items):  # bytewise order of the full names
    h.update(name + b"\0" + len(data).to_bytes(8, "little") + data)
print(h.hexdigest())
PY
}

# --- optional vTPM: swtpm before QEMU ------------------------------------------------
TPM_ARGS=()
if [[ -n "${VTPM:-}" ]]; then
	mkdir -p "$T/tpm"
	swtpm_setup --tpm2 --tpmstate "$T/tpm" --createek >"$T/swtpm_setup.log" 2>&1 ||
		fail "swtpm_setup: $(cat "$T/swtpm_setup.log")"
	swtpm socket --tpm2 --tpmstate dir="$T/tpm" --ctrl type=unixio,path="$T/swtpm.sock" \
		--terminate --log file="$T/swtpm.log" </dev/null >/dev/null 2>&1 &
	SWTPM_PID=$!
	for _ in $(seq 1 100); do
		[[ -S "$T/swtpm.sock" ]] && break
		kill -0 "$SWTPM_PID" 2>/dev/null || fail "swtpm exited: $(cat "$T/swtpm.log" 2>/dev/null)"
		sleep 0.05
	done
	[[ -S "$T/swtpm.sock" ]] || fail "swtpm socket $T/swtpm.sock did not appear"
	TPM_ARGS=(-chardev socket,id=chrtpm,path="$T/swtpm.sock"
		-tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0)
	echo "swtpm (pid $SWTPM_PID) listening on $T/swtpm.sock"
fi

# --- boot ------------------------------------------------------------------------------
start=$(date +%s.%N)
qemu-system-x86_64 -machine q35 -cpu "$CPU" -smp 1,maxcpus=64 -m "$MEM",slots=5,maxmem=30G \
	-drive if=pflash,format=raw,unit=0,file=/usr/share/OVMF/OVMF_CODE.fd,readonly=on \
	-drive if=pflash,format=raw,unit=1,file="$T/vars.fd" \
	-netdev user,id=vmnic-x,hostfwd=tcp:127.0.0.1:"$PORT"-:7002 \
	-device virtio-net-pci,disable-legacy=on,iommu_platform=true,netdev=vmnic-x,addr=0x2,romfile= \
	-kernel "$KERNEL" -append "$APPEND" -initrd "$INITRD" \
	-nographic -monitor pty \
	-fsdev local,id=cert_fs,path="$T/certs",security_model=mapped,readonly=on -device virtio-9p-pci,fsdev=cert_fs,mount_tag=certs_share \
	-fsdev local,id=env_fs,path="$T/env",security_model=mapped,readonly=on -device virtio-9p-pci,fsdev=env_fs,mount_tag=env_share \
	-chardev socket,id=qmp,path="$T/qmp.sock",server=on,wait=off -mon chardev=qmp,mode=control \
	-chardev socket,id=console,path="$T/console.sock",server=on,wait=off -serial chardev:console \
	"${TPM_ARGS[@]}" \
	>"$T/qemu.out" 2>&1 </dev/null &
QEMU_PID=$!

# Capture the serial console from its socket.
python3 - "$T/console.sock" "$T/console.log" <<'PY' &
import socket, sys, time
for _ in range(100):
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); break
    except OSError:
        time.sleep(0.05)
with open(sys.argv[2], "wb", buffering=0) as f:
    while True:
        d = s.recv(4096)
        if not d:
            break
        f.write(d)
PY
CONSOLE_PID=$!

first_connect=""
up=""
for _ in $(seq 1 240); do
	kill -0 "$QEMU_PID" 2>/dev/null || fail "qemu exited: $(cat "$T/qemu.out")"
	if [[ -z "$first_connect" ]] && python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$PORT),1)" 2>/dev/null; then
		first_connect=$(echo "$(date +%s.%N) - $start" | bc)
	fi
	if [[ "$(curl -s -m 2 "http://127.0.0.1:$PORT/health" 2>/dev/null)" == ok ]]; then
		up=$(echo "$(date +%s.%N) - $start" | bc)
		break
	fi
	sleep 0.25
done
[[ -n "$up" ]] || fail "agent did not answer within 60 s"
echo "host port accepted TCP after ${first_connect}s; /health ok after ${up}s (cpu=$CPU, append='$APPEND', vtpm=${VTPM:-no})"

# --- endpoints ---------------------------------------------------------------------------
curl -sS -o "$T/env.out" "http://127.0.0.1:$PORT/env"
cmp -s "$T/env.out" "$T/env/environment" || fail "/env mismatch: $(cat "$T/env.out")"
echo "/env ok"
certs=$(curl -sS "http://127.0.0.1:$PORT/certs")
want_certs=$(cd "$T/certs" && ls -1A | LC_ALL=C sort)
[[ "$certs" == "$want_certs" ]] || fail "/certs mismatch: '$certs' (want '$want_certs')"
echo "/certs ok ($(echo "$certs" | tr '\n' ' '))"

guest_hd=$(curl -sS -w ' %{http_code}' "http://127.0.0.1:$PORT/hostdata")
host_hd=$(host_hostdata "$T/certs" "$T/env/environment")
echo "/hostdata guest: $guest_hd"
echo "/hostdata host:  $host_hd (python3 hashlib)"
[[ "$guest_hd" == "$host_hd 200" ]] || fail "/hostdata mismatch"
echo "/hostdata ok"

pcrs_code=$(curl -sS -o "$T/pcrs.out" -w '%{http_code}' "http://127.0.0.1:$PORT/pcrs")
if [[ -n "${VTPM:-}" ]]; then
	[[ "$pcrs_code" == 200 ]] || fail "/pcrs answered $pcrs_code: $(cat "$T/pcrs.out")"
	cat "$T/pcrs.out"
	python3 - "$T/pcrs.out" <<'PY' || fail "/pcrs content"
import re, sys
lines = open(sys.argv[1], "rb").read().decode().split("\n")
assert lines[-1] == "", "no final newline"
lines = lines[:-1]
assert [l.split(" ")[0] for l in lines] == [str(i) for i in range(10)], lines
pcr = {}
for l in lines:
    i, v = l.split(" ")
    assert re.fullmatch(r"[0-9a-f]{64}", v), l
    pcr[int(i)] = v
zero = [i for i in (0, 1, 2, 3, 4, 5, 6, 7, 9) if pcr[i] == "0" * 64]
assert not zero, "PCRs still zero: %s" % zero
PY
	if [[ -n "${PCRS_OUT:-}" ]]; then cp "$T/pcrs.out" "$PCRS_OUT"; fi
	echo "/pcrs ok (PCRs 0-7 and 9 non-zero)"
	pred=$("$HERE/pcr-predict.py" --kernel "$KERNEL" --initrd "$INITRD" --append "$APPEND" --memory "$MEM") ||
		fail "pcr-predict.py failed"
	got=$(grep -E '^(4|9) ' "$T/pcrs.out")
	[[ "$pred" == "$got" ]] || fail "PCR 4/9 differ from pcr-predict.py, which predicts: $pred"
	echo "PCR 4 and 9 equal the host-side prediction (pcr-predict.py)"
else
	[[ "$pcrs_code" == 404 ]] || fail "/pcrs without a TPM answered $pcrs_code: $(cat "$T/pcrs.out")"
	echo "/pcrs without a TPM: 404 $(cat "$T/pcrs.out")"
fi

python3 - "$PORT" <<'PY' || fail "raw HTTP/1.0 client"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5)
s.settimeout(10)
s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
d = b""
while True:
    c = s.recv(4096)
    if not c:
        break
    d += c
assert d.startswith(b"HTTP/1.1 200 ") and d.endswith(b"\r\n\r\nok"), d
PY
echo "raw HTTP/1.0 client ok (connection closed by server)"

# --- shutdown ------------------------------------------------------------------------------
python3 - "$T/qmp.sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
for c in ("qmp_capabilities", "system_powerdown"):
    f.write(json.dumps({"execute": c}) + "\n"); f.flush(); f.readline()
PY
t0=$(date +%s.%N)
for _ in $(seq 1 60); do
	kill -0 "$QEMU_PID" 2>/dev/null || break
	sleep 0.25
done
if kill -0 "$QEMU_PID" 2>/dev/null; then
	fail "QEMU still running 15 s after system_powerdown"
fi
wait "$QEMU_PID" 2>/dev/null || true
QEMU_PID=""
echo "system_powerdown: QEMU exited after $(echo "$(date +%s.%N) - $t0" | bc)s"

if [[ -n "$SWTPM_PID" ]]; then
	# --terminate: swtpm exits by itself once QEMU closes the connection.
	for _ in $(seq 1 50); do
		kill -0 "$SWTPM_PID" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$SWTPM_PID" 2>/dev/null; then
		fail "swtpm (pid $SWTPM_PID) still running 5 s after QEMU exited"
	fi
	wait "$SWTPM_PID" 2>/dev/null || true
	SWTPM_PID=""
	if pgrep -f "$T/swtpm.sock" >/dev/null; then
		fail "a process still refers to $T/swtpm.sock: $(pgrep -af "$T/swtpm.sock")"
	fi
	if [[ -e "$T/swtpm.sock" ]]; then
		fail "swtpm exited but left its socket $T/swtpm.sock"
	fi
	echo "swtpm exited with QEMU; no swtpm process or socket left"
fi

echo "--- console:"
tr -d '\033' <"$T/console.log" | grep -a -E 'dev-guest|reboot|Kernel panic' || true
echo PASS
