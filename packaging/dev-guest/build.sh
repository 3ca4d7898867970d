#!/usr/bin/env bash
# Build the Cocos development guest from the Debian archive only:
#
#   target/dev-guest/bzImage          Debian linux-image-<abi>-amd64 kernel
#   target/dev-guest/rootfs.cpio.gz   initramfs: busybox-static, virtio/9p/acpi/tpm
#                                     modules, /init, agent stand-in on :7002
#
# Usage: packaging/dev-guest/build.sh        (from any directory)
#        FORCE=1 packaging/dev-guest/build.sh   rebuild even if up to date
#
# Idempotent: exits at once when both outputs are newer than build.sh and the
# guest files (init, agent-http, hostdata, udhcpc.script, power-button). Downloaded .debs
# are cached in target/dev-guest/work/debs; apt-get update runs only when
# resolving/downloading fails. Host tools (QEMU as one consistent set, OVMF,
# swtpm, ...) are installed by packaging/host-tools.sh on every invocation.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT="$ROOT/target/dev-guest"
WORK="$OUT/work"
BZIMAGE="$OUT/bzImage"
ROOTFS="$OUT/rootfs.cpio.gz"

# Modules init loads, in this order (their dependencies are added first;
# built-in ones are skipped). evdev + button: ACPI power button -> acpid.
# tpm_crb (QEMU -device tpm-crb) and tpm_tis (-device tpm-tis) for a vTPM; both
# are built into Debian's 6.1 kernel (CONFIG_TCG_TPM=y etc.), so nothing ships.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
	failover net_failover virtio_net netfs fscache 9pnet 9pnet_virtio 9p evdev button
	tpm_crb tpm_tis)

# Guest files taken from this directory.
GUEST_FILES=(init agent-http hostdata udhcpc.script power-button)

log() { echo "dev-guest build: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- host tools: every invocation, before the fast path --------------------------
# (an up-to-date guest is no use if QEMU, qemu-img or swtpm went missing)
"$ROOT/packaging/host-tools.sh" install

# --- fast path: nothing to do ------------------------------------------------------
if [[ -z "${FORCE:-}" && -s "$BZIMAGE" && -s "$ROOTFS" ]]; then
	stale=0
	for f in "$HERE/build.sh" "${GUEST_FILES[@]/#/$HERE/}"; do
		if [[ ! -e "$f" || "$f" -nt "$BZIMAGE" || "$f" -nt "$ROOTFS" ]]; then
			stale=1
			break
		fi
	done
	if ((stale == 0)); then
		log "up to date: $BZIMAGE $ROOTFS"
		exit 0
	fi
fi

for f in "${GUEST_FILES[@]}"; do
	[[ -f "$HERE/$f" ]] || die "missing $HERE/$f"
done

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
	command -v sudo >/dev/null || die "not root and no sudo: cannot apt-get install/update"
	SUDO=(sudo)
fi

APT_UPDATED=0
apt_update() {
	if [[ $APT_UPDATED -eq 0 ]]; then
		log "apt-get update"
		"${SUDO[@]}" apt-get update -qq
		APT_UPDATED=1
	fi
}

# --- download the kernel + busybox .debs ------------------------------------------
mkdir -p "$WORK/debs"
DEBS="$WORK/debs"

# linux-image-amd64 -> linux-image-<abi>-amd64 (not the cloud flavour: no 9p there)
resolve_kernel_pkg() {
	apt-cache depends linux-image-amd64 2>/dev/null |
		awk '$1 ~ /^\|?Depends:$/ && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }'
}

fetch() { # PACKAGE -> prints path of the cached .deb
	local pkg=$1 deb
	deb=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*_amd64.deb" -print -quit)
	if [[ -z "$deb" ]]; then
		log "apt-get download $pkg"
		if ! (cd "$DEBS" && apt-get download -q "$pkg:amd64" >&2); then
			apt_update
			(cd "$DEBS" && apt-get download -q "$pkg:amd64" >&2)
		fi
		deb=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*_amd64.deb" -print -quit)
		[[ -n "$deb" ]] || die "apt-get download $pkg produced no .deb"
	fi
	echo "$deb"
}

KPKG=$(resolve_kernel_pkg || true)
if [[ -z "$KPKG" ]]; then
	apt_update
	KPKG=$(resolve_kernel_pkg || true)
	[[ -n "$KPKG" ]] || die "cannot resolve linux-image-amd64 dependency (apt-cache depends)"
fi
KDEB=$(fetch "$KPKG")
BBDEB=$(fetch busybox-static)
KVER=${KPKG#linux-image-}
log "kernel: $(basename "$KDEB")"
log "busybox: $(basename "$BBDEB")"

# --- unpack -----------------------------------------------------------------------------
rm -rf "$WORK/kernel" "$WORK/busybox" "$WORK/rootfs"
dpkg -x "$KDEB" "$WORK/kernel"
dpkg -x "$BBDEB" "$WORK/busybox"
trap 'rm -rf "$WORK/kernel"' EXIT # ~400 MB of modules; the .deb stays cached

VMLINUZ="$WORK/kernel/boot/vmlinuz-$KVER"
[[ -f "$VMLINUZ" ]] || die "no boot/vmlinuz-$KVER in $KDEB"
MODDIR=""
for d in "$WORK/kernel/lib/modules/$KVER" "$WORK/kernel/usr/lib/modules/$KVER"; do
	[[ -d "$d" ]] && MODDIR=$d && break
done
[[ -n "$MODDIR" ]] || die "no lib/modules/$KVER in $KDEB"
BUSYBOX="$WORK/busybox/bin/busybox"
[[ -x "$BUSYBOX" ]] || BUSYBOX="$WORK/busybox/usr/bin/busybox"
[[ -x "$BUSYBOX" ]] || die "no busybox binary in $BBDEB"

# --- rootfs skeleton + busybox -------------------------------------------------------
R="$WORK/rootfs"
mkdir -p "$R"/{bin,dev,proc,sys,run,tmp,root,var/log,etc/acpi/PWRF,etc/certs,etc/cocos,lib/modules,usr/libexec/dev-guest}
chmod 1777 "$R/tmp"
ln -s bin "$R/sbin"
ln -s ../bin "$R/usr/bin"
ln -s ../bin "$R/usr/sbin"
install -m 0755 "$BUSYBOX" "$R/bin/busybox"
"$BUSYBOX" --list | while read -r applet; do
	[[ "$applet" == busybox || -e "$R/bin/$applet" ]] || ln -s busybox "$R/bin/$applet"
done

install -m 0755 "$HERE/init" "$R/init"
install -m 0755 "$HERE/agent-http" "$R/usr/libexec/dev-guest/agent-http"
install -m 0755 "$HERE/hostdata" "$R/usr/libexec/dev-guest/hostdata"
install -m 0755 "$HERE/udhcpc.script" "$R/etc/udhcpc.script"
install -m 0755 "$HERE/power-button" "$R/etc/acpi/PWRF/00000080"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"
printf 'cocos-dev-guest\n' >"$R/etc/hostname"

# --- kernel modules (dependency closure, in load order) ------------------------------
declare -A SEEN=()
LOAD_ORDER=()
BUILTIN=()
ABSENT=()

is_builtin() {
	local pat=${1//_/[_-]}
	[[ -f "$MODDIR/modules.builtin" ]] && grep -Eq "/${pat}\.ko$" "$MODDIR/modules.builtin"
}

add_module() {
	local m=${1//-/_} src dst deps d
	[[ -n "${SEEN[$m]:-}" ]] && return 0
	SEEN[$m]=1
	if is_builtin "$m"; then
		BUILTIN+=("$m")
		return 0
	fi
	src=$(find "$MODDIR/kernel" -type f \( -name "${m//_/[_-]}.ko" -o -name "${m//_/[_-]}.ko.xz" \
		-o -name "${m//_/[_-]}.ko.zst" -o -name "${m//_/[_-]}.ko.gz" \) -print -quit)
	if [[ -z "$src" ]]; then
		ABSENT+=("$m")
		return 0
	fi
	dst="$R/lib/modules/$m.ko"
	case "$src" in
	*.ko.xz) xz -dc "$src" >"$dst" ;; # busybox insmod may not do compressed modules
	*.ko.zst) command -v zstd >/dev/null || die "need zstd for $src"; zstd -qdc "$src" >"$dst" ;;
	*.ko.gz) gzip -dc "$src" >"$dst" ;;
	*) cp "$src" "$dst" ;;
	esac
	deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')
	for d in $deps; do
		add_module "$d"
	done
	LOAD_ORDER+=("$m")
}

for m in "${MODULES[@]}"; do
	add_module "$m"
done
printf '%s\n' "${LOAD_ORDER[@]}" >"$R/lib/modules/load-order"
log "modules to load: ${LOAD_ORDER[*]}"
if ((${#BUILTIN[@]})); then log "built into the kernel: ${BUILTIN[*]}"; fi
if ((${#ABSENT[@]})); then log "not in this kernel (skipped): ${ABSENT[*]}"; fi

# --- write outputs atomically ---------------------------------------------------------
mkdir -p "$OUT"
(cd "$R" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
	cpio --null -o -H newc --owner=0:0 --reproducible --quiet) | gzip -9 -n >"$ROOTFS.tmp"
cp "$VMLINUZ" "$BZIMAGE.tmp"
mv -f "$BZIMAGE.tmp" "$BZIMAGE"
mv -f "$ROOTFS.tmp" "$ROOTFS"

{
	echo "kernel_package=$KPKG"
	echo "kernel_deb=$(basename "$KDEB")"
	echo "kernel_release=$KVER"
	echo "busybox_deb=$(basename "$BBDEB")"
	echo "modules=${LOAD_ORDER[*]}"
	echo "builtin=${BUILTIN[*]}"
	echo "absent=${ABSENT[*]}"
} >"$OUT/manifest.txt"

log "wrote $BZIMAGE ($(du -k "$BZIMAGE" | cut -f1) KiB)"
log "wrote $ROOTFS ($(du -k "$ROOTFS" | cut -f1) KiB)"
