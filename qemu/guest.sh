# shellcheck shell=bash
# Sourced by qemu/smoke and qemu/vm-test: the guest's Debian kernel and busybox, fetched with
# apt-get download and unpacked into the cache once; and hmp, which talks to a QEMU monitor.
#
# Needs: $cache (the cache directory) and the functions log and fail.
# Sets: $kernel (the vmlinuz path) and $busybox (the static busybox path).

# Fetches a .deb from the archive and unpacks it into DIR (once; DIR is the cache).
fetch_deb() {
    local pkg=$1 dir=$2
    [[ -d $dir ]] && return
    log "downloading $pkg"
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp/deb"
    (cd "$dir.tmp/deb" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "$pkg" >&2)
    dpkg-deb -x "$dir.tmp"/deb/*.deb "$dir.tmp/root"
    rm -rf "$dir.tmp/deb"
    mv "$dir.tmp" "$dir"
}

# Fetches Debian's current kernel (linux-image-amd64's dependency) and busybox-static.
fetch_guest() {
    local kernel_pkg kernel_ver kernel_dir busybox_ver busybox_dir
    kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    [[ -n $kernel_pkg ]] || fail "apt-cache names no kernel for linux-image-amd64"
    kernel_ver=$(apt-cache policy "$kernel_pkg" | awk '$1 == "Candidate:" { print $2 }')
    # shellcheck disable=SC2154 # $cache: set by the sourcing script
    kernel_dir=$cache/guest-$kernel_pkg-$kernel_ver
    fetch_deb "$kernel_pkg=$kernel_ver" "$kernel_dir"
    kernel=$(echo "$kernel_dir"/root/boot/vmlinuz-*)
    [[ -f $kernel ]] || fail "no kernel in $kernel_dir"

    busybox_ver=$(apt-cache policy busybox-static | awk '$1 == "Candidate:" { print $2 }')
    busybox_dir=$cache/guest-busybox-static-${busybox_ver//:/_}
    fetch_deb "busybox-static=$busybox_ver" "$busybox_dir"
    busybox=$busybox_dir/root/bin/busybox
    [[ -x $busybox ]] || fail "no busybox in $busybox_dir"
}

# Sends one HMP command to the monitor socket $1 and prints the answer.
hmp() {
    python3 - "$1" "$2" <<'EOF'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(10)
def read_prompt():
    data = b""
    while not data.endswith(b"(qemu) "):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")
read_prompt()
s.sendall(sys.argv[2].encode() + b"\n")
out = read_prompt()
# The monitor echoes the command line first.
lines = out.replace("\r", "").split("\n")[1:-1]
print("\n".join(lines))
EOF
}
