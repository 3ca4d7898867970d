#!/usr/bin/env bash
# Boot the development guest under QEMU/TCG the way the manager does and check
# the agent stand-in end to end (health, env, certs, QMP power-down).
#
# Usage: packaging/dev-guest/smoke-test.sh
# Env:   CPU=max|EPYC|...        (default max)
#        APPEND="console=ttyS0 quiet"   kernel command line
#        PORT=6150                host port forwarded to guest :7002
#        INITRD=path              (default target/dev-guest/rootfs.cpio.gz)
#        KEEP=1                   leave the scratch dir (console log) behind
# Needs: qemu-system-x86_64, ovmf, python3, curl. Never uses KVM.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CPU=${CPU:-max}
APPEND=${APPEND:-console=ttyS0 quiet}
PORT=${PORT:-6150}
KERNEL="$ROOT/target/dev-guest/bzImage"
INITRD=${INITRD:-$ROOT/target/dev-guest/rootfs.cpio.gz}
[[ -f "$KERNEL" && -f "$INITRD" ]] || "$HERE/build.sh"

T=$(mktemp -d /tmp/dev-guest-smoke.XXXXXX)
QEMU_PID=""
CONSOLE_PID=""
cleanup() {
	[[ -n "$CONSOLE_PID" ]] && kill "$CONSOLE_PID" 2>/dev/null || true
	if [[ -n "$QEMU_PID" ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
		kill "$QEMU_PID" 2>/dev/null || true
		wait "$QEMU_PID" 2>/dev/null || true
	fi
	if [[ -z "${KEEP:-}" ]]; then rm -rf "$T"; else echo "scratch dir kept: $T"; fi
}
trap cleanup EXIT

mkdir -p "$T/certs" "$T/env"
cp /usr/share/OVMF/OVMF_VARS.fd "$T/vars.fd"
echo cert >"$T/certs/cert.pem"
echo k >"$T/certs/key.pem"
chmod 600 "$T/certs/key.pem"
printf 'AGENT_LOG_LEVEL=info\nAGENT_CVM_ID=abc\n' >"$T/env/environment"

start=$(date +%s.%N)
qemu-system-x86_64 -machine q35 -cpu "$CPU" -smp 1,maxcpus=64 -m 512M,slots=5,maxmem=30G \
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
	>"$T/qemu.out" 2>&1 </dev/null &
QEMU_PID=$!

# Capture the serial console from its socket.
python3 - "$T/console.sock" "$T/console.log" <<'EOF' &
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
EOF
CONSOLE_PID=$!

fail() { echo "FAIL: $*"; echo "--- console:"; cat "$T/console.log" 2>/dev/null || true; exit 1; }

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
echo "host port accepted TCP after ${first_connect}s; /health ok after ${up}s (cpu=$CPU, append='$APPEND')"

curl -sS -o "$T/env.out" "http://127.0.0.1:$PORT/env"
cmp -s "$T/env.out" "$T/env/environment" || fail "/env mismatch: $(cat "$T/env.out")"
echo "/env ok"
certs=$(curl -sS "http://127.0.0.1:$PORT/certs")
[[ "$certs" == $'cert.pem\nkey.pem' ]] || fail "/certs mismatch: $certs"
echo "/certs ok"
python3 - "$PORT" <<'EOF' || fail "raw HTTP/1.0 client"
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
EOF
echo "raw HTTP/1.0 client ok (connection closed by server)"

python3 - "$T/qmp.sock" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
for c in ("qmp_capabilities", "system_powerdown"):
    f.write(json.dumps({"execute": c}) + "\n"); f.flush(); f.readline()
EOF
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
echo "--- console:"
tr -d '\033' <"$T/console.log" | grep -a -E 'dev-guest|reboot|Kernel panic' || true
echo PASS
