# Shared by scripts/test and scripts/demo: checks and installs what ferry's build and tests
# need on a Debian host, then builds (or reuses) the Linux test guest.

die() {
	echo "error: $*" >&2
	exit 1
}

require_kvm() {
	[ -e /dev/kvm ] || die "/dev/kvm does not exist: ferry needs KVM (load kvm_intel or kvm_amd, or run on a host that exposes KVM)"
	[ -c /dev/kvm ] || die "/dev/kvm is not a character device: ferry needs the KVM device"
	[ -r /dev/kvm ] && [ -w /dev/kvm ] || die "/dev/kvm is not readable and writable by $(id -un): run as root or join the kvm group"
	# Opening it is the real test (a device node can exist without a driver behind it).
	{ exec 3<>/dev/kvm; } 2>/dev/null || die "/dev/kvm cannot be opened: is the KVM module loaded?"
	exec 3>&-
}

require_rust() {
	command -v cargo >/dev/null || die "cargo not found: install Rust 1.85 or newer (rustup.rs), then run this again"
}

apt_install() {
	local sudo_cmd=()
	[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
	echo "installing $*" >&2
	"${sudo_cmd[@]}" apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "$@" >/dev/null
}

require_binutils() {
	command -v as >/dev/null && command -v ld >/dev/null || apt_install binutils
}

# The virtio-net tests make network namespaces and taps with ip(8).
require_iproute2() {
	command -v ip >/dev/null || apt_install iproute2
}

# A trust test traces which files a destination opens.
require_strace() {
	command -v strace >/dev/null || apt_install strace
}

# A migration test connects to a Unix-socket destination as another user with python3.
require_python3() {
	command -v python3 >/dev/null || apt_install python3-minimal
}

# The schema-driven API tester (tests/tests/api_schema.rs): schemathesis from PyPI, a pinned
# version in a virtual environment in the cache (seconds, once). Prints its binary's path.
SCHEMATHESIS_VERSION=4.32.5
require_schemathesis() {
	local venv="${FERRY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}/schemathesis-$SCHEMATHESIS_VERSION"
	if [ ! -x "$venv/bin/schemathesis" ]; then
		require_python3
		python3 -m venv --help >/dev/null 2>&1 || apt_install python3-venv
		rm -rf "$venv"
		python3 -m venv "$venv" >&2 || die "cannot make a Python virtual environment in $venv"
		echo "installing schemathesis $SCHEMATHESIS_VERSION into $venv" >&2
		"$venv/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION" >&2 ||
			die "cannot install schemathesis from PyPI (needed by the API schema test)"
	fi
	echo "$venv/bin/schemathesis"
}

# Prints the test guest's directory, building it first if needed (minutes, once).
test_guest() {
	bash "$repo/tests/guest/build.sh"
}
