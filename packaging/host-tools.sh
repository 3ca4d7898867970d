#!/usr/bin/env bash
# The host tools the manager's development profile and its tests use, in one place.
#
#   packaging/host-tools.sh install   install what is missing, as consistent sets, then check
#   packaging/host-tools.sh check     list every tool with its version; fail naming what is missing
#
# Why a script of its own: an apt install can remove another tool (Debian's
# qemu-system-x86 7.2 removes a backports qemu-utils 10), so the QEMU packages are
# installed as one set pinned to the same version, and everything is checked again
# after installing. packaging/dev-guest/build.sh runs `install` on every invocation,
# before its up-to-date fast path; .ci/run runs `check` before any test.
set -euo pipefail

log() { echo "host-tools: $*" >&2; }
die() { log "error: $*"; exit 1; }

# tool name | Debian package that provides it | how to print its version
TOOLS=(
	"cpio|cpio|cpio --version | head -n1"
	"gzip|gzip|gzip --version | head -n1"
	"xz|xz-utils|xz --version | head -n1"
	"qemu-system-x86_64|qemu-system-x86|qemu-system-x86_64 --version | head -n1"
	"qemu-img|qemu-utils|qemu-img --version | head -n1"
	"swtpm|swtpm|swtpm --version | head -n1"
	"swtpm_setup|swtpm-tools|swtpm_setup --version | head -n1"
	"openssl|openssl|openssl version"
	"python3|python3|python3 --version"
	"setpriv|util-linux|setpriv --version"
	"mount|mount|mount --version"
	"dpkg-deb|dpkg|dpkg-deb --version | head -n1"
)
# Files the development profile and the tests read.
FILES=(
	"/usr/share/OVMF/OVMF_CODE.fd|ovmf"
	"/usr/share/OVMF/OVMF_VARS.fd|ovmf"
)
# Packages whose versions must agree with each other: pinned to one version.
QEMU_SET=(qemu-system-x86 qemu-utils)
QEMU_COMPANIONS=(qemu-system-common qemu-system-data qemu-system-gui qemu-block-extra qemu-system-modules-spice qemu-system-modules-opengl)

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
	SUDO=(sudo)
fi

installed_version() { { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null || true; } | awk '$3 == "installed" { print $4 }'; }

candidate_version() { { apt-cache policy "$1" 2>/dev/null || true; } | awk '$1 == "Candidate:" && $2 != "(none)" { print $2; exit }'; }

# Versions of PACKAGE the configured archives offer (not only what dpkg has).
archive_versions() {
	apt-cache madison "$1" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }'
}

missing_tools() {
	local entry tool pkg
	for entry in "${TOOLS[@]}"; do
		IFS='|' read -r tool pkg _ <<<"$entry"
		command -v "$tool" >/dev/null || echo "$tool|$pkg"
	done
	for entry in "${FILES[@]}"; do
		IFS='|' read -r tool pkg <<<"$entry"
		[[ -f "$tool" ]] || echo "$tool|$pkg"
	done
}

check() {
	local entry tool pkg ver bad=0
	for entry in "${TOOLS[@]}"; do
		IFS='|' read -r tool pkg ver <<<"$entry"
		if command -v "$tool" >/dev/null; then
			printf '  %-20s %s\n' "$tool" "$(bash -c "$ver" 2>&1 | tr -s ' ' | head -c 120)"
		else
			printf '  %-20s MISSING (Debian package %s: packaging/host-tools.sh install)\n' "$tool" "$pkg"
			bad=1
		fi
	done
	for entry in "${FILES[@]}"; do
		IFS='|' read -r tool pkg <<<"$entry"
		if [[ -f "$tool" ]]; then
			printf '  %-20s %s (%s %s)\n' "$(basename "$tool")" "$tool" "$pkg" "$(installed_version "$pkg")"
		else
			printf '  %-20s MISSING %s (Debian package %s: packaging/host-tools.sh install)\n' "$(basename "$tool")" "$tool" "$pkg"
			bad=1
		fi
	done
	if python3 -c 'import sevsnpmeasure' 2>/dev/null; then
		printf '  %-20s %s\n' "sev-snp-measure" "$(python3 -m pip show sev-snp-measure 2>/dev/null | awk '$1 == "Version:" { print $2 }')"
	else
		printf '  %-20s MISSING (PyPI package sev-snp-measure: packaging/host-tools.sh install)\n' "sev-snp-measure"
		bad=1
	fi
	if cargo deb --version >/dev/null 2>&1; then
		printf '  %-20s %s\n' "cargo-deb" "$(cargo deb --version 2>&1 | head -n1)"
	else
		printf '  %-20s MISSING (crates.io cargo-deb: packaging/host-tools.sh install)\n' "cargo-deb"
		bad=1
	fi
	local qv uv
	qv=$(installed_version qemu-system-x86)
	uv=$(installed_version qemu-utils)
	if [[ -n "$qv" && -n "$uv" && "$qv" != "$uv" ]]; then
		printf '  QEMU set inconsistent: qemu-system-x86 %s, qemu-utils %s\n' "$qv" "$uv"
		bad=1
	fi
	return $bad
}

APT_UPDATED=0
apt_update() {
	if [[ $APT_UPDATED -eq 0 ]]; then
		log "apt-get update"
		"${SUDO[@]}" apt-get update -qq
		APT_UPDATED=1
	fi
}

apt_install() {
	log "apt-get install $*"
	if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades "$@"; then
		apt_update
		"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades "$@"
	fi
}

# The QEMU set: every package at the version of qemu-system-x86 (installed, or
# the archive's candidate), so installing one never removes or skews another.
qemu_plan() {
	local want pkg have
	want=$(installed_version qemu-system-x86)
	if [[ -z "$want" ]]; then
		want=$(candidate_version qemu-system-x86)
		if [[ -z "$want" ]]; then
			apt_update
			want=$(candidate_version qemu-system-x86)
		fi
		[[ -n "$want" ]] || die "no qemu-system-x86 in the configured archives"
	fi
	for pkg in "${QEMU_SET[@]}"; do
		have=$(installed_version "$pkg")
		[[ "$have" == "$want" ]] || echo "$pkg=$want"
	done
	for pkg in "${QEMU_COMPANIONS[@]}"; do
		have=$(installed_version "$pkg")
		if [[ -n "$have" && "$have" != "$want" ]] && archive_versions "$pkg" | grep -qxF "$want"; then
			echo "$pkg=$want"
		fi
	done
}

install() {
	local plan=() line pkg
	while read -r line; do [[ -n "$line" ]] && plan+=("$line"); done < <(qemu_plan)
	while IFS='|' read -r _ pkg; do
		[[ -z "$pkg" ]] && continue
		case "$pkg" in qemu-system-x86 | qemu-utils) continue ;; esac # pinned above
		[[ " ${plan[*]} " == *" $pkg "* ]] || plan+=("$pkg")
	done < <(missing_tools)
	if ((${#plan[@]})); then
		apt_install "${plan[@]}"
	fi
	if ! python3 -c 'import sevsnpmeasure' 2>/dev/null; then
		log "pip install sev-snp-measure (the reference SEV-SNP launch digest, for known-answer tests)"
		python3 -m pip install -q --disable-pip-version-check sev-snp-measure
	fi
	if ! cargo deb --version >/dev/null 2>&1; then
		log "cargo install cargo-deb (builds the Debian package; tests/deb.rs)"
		cargo install -q cargo-deb --version 3.8.0 --locked
	fi
	# An install can remove another tool: look again.
	local still
	still=$(missing_tools | cut -d'|' -f1 | tr '\n' ' ')
	[[ -z "${still// /}" ]] || die "still missing after install: $still"
}

case "${1:-check}" in
install)
	install
	;;
check)
	echo "host tools:"
	check || die "a tool the tests need is missing or inconsistent (listed above)"
	;;
*)
	die "usage: $0 install|check"
	;;
esac
