#!/usr/bin/env bash
# Builds ferry's Linux test guest from Debian packages only, and caches it.
#
#   tests/guest/build.sh            build if needed; print the guest directory on stdout
#
# The guest directory holds vmlinux (ELF with a PVH entry note), bzImage, initramfs.cpio
# (a few KiB: /init and /dev/console), cmdline (the default kernel command line) and
# VERSION (the Debian source package it was built from). It lives in
# ${FERRY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}/guest-<hash>, where <hash> is
# the SHA-256 of this script and every input beside it, so a change to any input builds a
# new guest and an unchanged tree reuses the old one.
#
# Inputs: linux-source-6.1 (apt-get download + dpkg -x), kernel.config (fragment over
# tinyconfig), patches/*.patch, ferry_workload.c, ferry_service.c, init.S. Build tools come from apt-get
# (make, gcc, flex, bison, bc, libelf-dev, libssl-dev, xz-utils, cpio, lz4).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${FERRY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}
key=$(cd "$here" && cat build.sh kernel.config ferry_workload.c ferry_service.c init.S patches/*.patch | sha256sum | cut -c1-16)
out="$cache_root/guest-$key"

if [ -f "$out/.complete" ]; then
	echo "$out"
	exit 0
fi

log() { echo "guest: $*" >&2; }

need_pkgs=()
for tool in make:make flex:flex bison:bison bc:bc gcc:gcc xz:xz-utils perl:perl cpio:cpio lz4:lz4; do
	command -v "${tool%%:*}" >/dev/null || need_pkgs+=("${tool#*:}")
done
dpkg -s libelf-dev >/dev/null 2>&1 || need_pkgs+=(libelf-dev)
dpkg -s libssl-dev >/dev/null 2>&1 || need_pkgs+=(libssl-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
	log "installing build tools: ${need_pkgs[*]}"
	sudo_cmd=()
	[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
	"${sudo_cmd[@]}" apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

work="$cache_root/build-$key"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
cd "$work"

log "fetching linux-source-6.1 from Debian"
(apt-get download linux-source-6.1 >&2 || { apt-get update -qq >&2 && apt-get download linux-source-6.1 >&2; })
deb=$(ls linux-source-6.1_*.deb)
dpkg -x "$deb" pkg
version=$(dpkg-deb -f "$deb" Version)
log "unpacking linux-source-6.1 $version"
tar -xf pkg/usr/src/linux-source-6.1.tar.xz
rm -rf pkg "$deb"
src="$work/linux-source-6.1"

cp "$here/ferry_workload.c" "$here/ferry_service.c" "$src/kernel/"
echo 'obj-y += ferry_workload.o ferry_service.o' >>"$src/kernel/Makefile"
for p in "$here"/patches/*.patch; do
	log "applying $(basename "$p")"
	patch -d "$src" -p1 --quiet --forward <"$p" >&2
done

log "configuring (tinyconfig + kernel.config)"
make -C "$src" -s tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/kernel.config" >merge.log 2>&1 || { cat merge.log >&2; exit 1; }
make -C "$src" -s olddefconfig >&2
missing=0
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=*) grep -qx "$line" "$src/.config" && continue ;;
	"# CONFIG_"*" is not set")
		opt=${line#"# "}
		opt=${opt%" is not set"}
		grep -q "^$opt=" "$src/.config" || continue
		;;
	*) continue ;;
	esac
	log "config did not take: $line"
	missing=1
done <"$here/kernel.config"
[ "$missing" -eq 0 ] || exit 1

log "building vmlinux and bzImage on $(nproc) cores (a few minutes)"
make -C "$src" -s -j"$(nproc)" vmlinux bzImage >&2

log "building the initramfs"
gcc -nostdlib -static -Wl,--build-id=none -s -o init "$here/init.S"
cat >initramfs.list <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
file /init $work/init 0755 0 0
LIST
"$src/usr/gen_init_cpio" initramfs.list >initramfs.cpio

stage="$cache_root/stage-$key"
rm -rf "$stage"
mkdir -p "$stage"
cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" initramfs.cpio "$stage/"
cp "$src/.config" "$stage/config"
echo "linux-source-6.1 $version" >"$stage/VERSION"
echo "console=ttyS0 noxsave clearcpuid=popcnt,smap,fsgsbase,cx16 8250.nr_uarts=1 reboot=k rodata=off quiet ferry.park" >"$stage/cmdline"
touch "$stage/.complete"
rm -rf "$out"
mv "$stage" "$out"
log "built $(du -sh "$out" | cut -f1) in $out"
echo "$out"
