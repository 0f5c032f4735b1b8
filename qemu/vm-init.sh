#!/bin/busybox sh
# shellcheck shell=dash
# /init of the two-VM test's guests (qemu/vm-test copies it into the initramfs). Busybox ash,
# one file for both guests: `vrdma_role=vm1` (the servers) or `vrdma_role=vm2` (the clients)
# on the kernel command line. Every line for the host starts with "vrdma-vm-test: "; the host
# checks them on the serial console. /test.conf (written by qemu/vm-test) sets the addresses,
# ports, counts and deadlines.
#
# Steps: (a) vrdma-devinfo --pci, polling, then with uio_pci_generic (interrupts); (b) the
# network: addresses, ping and a TCP fetch each way; (c) ibv_rc_pingpong through the shim,
# then ibv_ud_pingpong (UD) and ibv_srq_pingpong (a shared receive queue, completion events);
# (d) vrdma-perf write_bw and write_lat, payloads verified (--check); (e) perftest's ib_write_bw through the shim; (f) a
# longer ibv_rc_pingpong during which the host migrates vm2 to another QEMU and daemon: vm2
# sizes it from (c)'s time per iteration to last about MIGRATE_SECONDS and publishes the count
# for vm1 (the host migrates once the daemon counts the step's traffic). vm1 runs the servers,
# vm2 the clients.
#
# Synchronisation: each guest serves /www over HTTP (busybox httpd); a step's status file there
# says "running" or "exit N". A client waits until the server's status for the step exists,
# retries only failures to connect, and only while the server's status says "running", until
# its deadline. A server runs until it exits, until the client's status says it has finished
# (then GRACE seconds more) or until its deadline. So a step that fails on one side ends the
# step on the other side too, and no sleep decides an outcome.

/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/hugepages /www /tmp/steps
mount -t hugetlbfs hugetlbfs /dev/hugepages
# shellcheck source=/dev/null
. /test.conf

say() { echo "vrdma-vm-test: $*"; }
now() { date +%s; }

role=$(sed -n 's/.*vrdma_role=\(vm[12]\).*/\1/p' /proc/cmdline)
case $role in
vm1) me=$NET_VM1 peer=$NET_VM2 ;;
vm2) me=$NET_VM2 peer=$NET_VM1 ;;
*)
    say "error: no vrdma_role=vm1|vm2 on the kernel command line: $(cat /proc/cmdline)"
    poweroff -f
    ;;
esac
say "start $role at $(cut -d' ' -f1 /proc/uptime) s, hugepages $(cat /proc/sys/vm/nr_hugepages) of $(awk '/^Hugepagesize:/ { print $2 $3 }' /proc/meminfo)"
[ "$(cat /proc/sys/vm/nr_hugepages)" -gt 0 ] || say "error: no hugepages reserved"

# Keep the kernel's virtio-pci driver (loaded for virtio-net) off the vrdma function: with
# driver_override set, only uio_pci_generic may bind it.
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x1af4:0x106a ]; then
        echo uio_pci_generic >"$d/driver_override"
        say "vrdma function ${d##*/}"
    fi
done
# Loads the modules listed in FILE, dependencies first (qemu/vm-test orders them).
load_modules() {
    while read -r m; do
        insmod "/modules/$m.ko" || say "error: cannot load $m"
    done <"$1"
}
load_modules /modules/net.list

# (a) vrdma-devinfo, first without uio_pci_generic: the transport polls.
/bin/vrdma-devinfo --pci >/tmp/polling.out 2>&1
say "polling devinfo exit $? hca $(grep -c '^hca_id:' /tmp/polling.out)"
load_modules /modules/uio.list
/bin/vrdma-devinfo --pci -v >/tmp/devinfo.out 2>/tmp/devinfo.err
status=$?
sed 's/^/vrdma-vm-test: out: /' /tmp/devinfo.out
sed 's/^/vrdma-vm-test: err: /' /tmp/devinfo.err
say "devinfo exit $status"
say "uio interrupts $(awk '/uio/ { n = 0; for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) n += $i; print n }' /proc/interrupts)"

# (b) The network: the first interface that is not lo, a static address.
ip link set lo up
ifname=
for i in /sys/class/net/*; do
    [ "${i##*/}" = lo ] || {
        ifname=${i##*/}
        break
    }
done
if [ -z "$ifname" ]; then
    say "error: no network interface"
else
    if ! ip addr add "$me/24" dev "$ifname" || ! ip link set "$ifname" up; then
        say "error: cannot configure $ifname"
    fi
    say "net $ifname $(cat "/sys/class/net/$ifname/address") $me"
fi
echo "$role" >/www/hello
httpd -p "$HTTP_PORT" -h /www || say "error: httpd did not start"

# Prints the peer's status file NAME (empty if it has none or cannot be reached). Bounded by
# timeout: busybox 1.35's `wget -T` crashes (SIGSEGV) in Debian 12's busybox-static.
peer_status() {
    timeout -s KILL 5 wget -q -O - "http://$peer:$HTTP_PORT/$1" 2>/dev/null
}
set_status() {
    echo "$2" >"/www/$1.tmp" && mv "/www/$1.tmp" "/www/$1"
}
# Waits until CMD... succeeds, trying every second until SECS have passed.
until_ok() {
    secs=$1
    shift
    end=$(($(now) + secs))
    until "$@"; do
        [ "$(now)" -lt "$end" ] || return 1
        sleep 1
    done
}

ping_peer() { ping -c 1 -W 1 "$peer" >/dev/null 2>&1; }
fetch_hello() { [ "$(peer_status hello)" = "${peer_role}" ]; }
case $role in vm1) peer_role=vm2 ;; *) peer_role=vm1 ;; esac
started=$(now)
net_ok=1
if until_ok "$NET_WAIT" ping_peer; then
    say "net ping $peer ok after $(($(now) - started)) s"
else
    say "error: no ping reply from $peer in $NET_WAIT s"
    net_ok=
fi
if until_ok "$NET_WAIT" fetch_hello; then
    say "net tcp $peer ok after $(($(now) - started)) s"
else
    say "error: no TCP (HTTP) answer from $peer in $NET_WAIT s"
    net_ok=
fi

# Prints a step's output for the host, each line prefixed, and its result.
report() {
    name=$1 status=$2 extra=$3
    sed "s/^/vrdma-vm-test: $name: /" "/tmp/steps/$name.out"
    say "step $name $role exit $status$extra"
}

# A server side: runs CMD... in the background until it exits, the client has finished and
# GRACE seconds have passed, or SERVER_WAIT seconds have passed.
server_step() {
    name=$1
    shift
    set_status "$name" running
    "$@" >"/tmp/steps/$name.out" 2>&1 &
    pid=$!
    t0=$(now)
    end=$((t0 + SERVER_WAIT))
    grace_end=
    stopped=
    while kill -0 "$pid" 2>/dev/null; do
        t=$(now)
        if [ -z "$grace_end" ]; then
            case $(peer_status "$name") in exit*) grace_end=$((t + GRACE)) ;; esac
        fi
        if [ "$t" -ge "$end" ] || { [ -n "$grace_end" ] && [ "$t" -ge "$grace_end" ]; }; then
            kill -9 "$pid" 2>/dev/null
            stopped=" (killed: still running after $((t - t0)) s)"
            break
        fi
        sleep 1
    done
    wait "$pid"
    status=$?
    set_status "$name" "exit $status"
    report "$name" "$status" "$stopped"
}

# A client side: waits for the server's side to start, then runs CMD... until it succeeds,
# fails other than by not reaching the server, the server's side ends, or CLIENT_WAIT passes.
client_step() {
    name=$1
    shift
    end=$(($(now) + CLIENT_WAIT))
    until [ -n "$(peer_status "$name")" ]; do
        if [ "$(now)" -ge "$end" ]; then
            echo "the server's side of $name did not start in $CLIENT_WAIT s" >"/tmp/steps/$name.out"
            set_status "$name" "exit 124"
            report "$name" 124 ""
            return
        fi
        sleep 1
    done
    attempts=0
    while :; do
        attempts=$((attempts + 1))
        timeout -s KILL "$ATTEMPT_LIMIT" "$@" >"/tmp/steps/$name.out" 2>&1
        status=$?
        [ "$status" -eq 0 ] && break
        grep -qiE "$CONNECT_FAILURE" "/tmp/steps/$name.out" || break
        [ "$(peer_status "$name")" = running ] || break
        [ "$(now)" -lt "$end" ] || break
        sleep 1
    done
    set_status "$name" "exit $status"
    report "$name" "$status" ", $attempts attempts"
}

# The iterations of the migration's ping-pong: about MIGRATE_SECONDS at the time per iteration
# rc_pingpong's step measured (TCG's speed varies with the host), within the configured bounds.
migrate_iters() {
    usec=$(sed -n 's/.* iters in .* seconds = \([0-9]*\).* usec\/iter.*/\1/p' /tmp/steps/rc_pingpong.out)
    n=$((MIGRATE_SECONDS * 1000000 / ${usec:-1000}))
    [ "$n" -ge "$MIGRATE_MIN_ITERS" ] || n=$MIGRATE_MIN_ITERS
    [ "$n" -le "$MIGRATE_MAX_ITERS" ] || n=$MIGRATE_MAX_ITERS
    echo "$n"
}
fetch_migrate_iters() {
    iters=$(peer_status migrate_iters)
    [ -n "$iters" ]
}

# The libibverbs shim, preloaded into Debian's verbs programs.
shim=LD_PRELOAD=/lib/libvrdma_ibverbs.so

# (c) to (e): vm1 serves, vm2 connects to it; without the network, neither can run.
if [ -z "$net_ok" ]; then
    for name in rc_pingpong ud_pingpong srq_pingpong write_bw write_lat ib_write_bw migrate; do
        say "step $name $role skipped: no network"
    done
elif [ "$role" = vm1 ]; then
    server_step rc_pingpong env "$shim" ibv_rc_pingpong -d vrdma0 -g 0 -n "$PINGPONG_ITERS" -c -p "$PORT_PINGPONG"
    server_step ud_pingpong env "$shim" ibv_ud_pingpong -d vrdma0 -g 0 -n "$PINGPONG_ITERS" -s "$UD_SIZE" -p "$PORT_UD_PINGPONG"
    server_step srq_pingpong env "$shim" ibv_srq_pingpong -d vrdma0 -g 0 -n "$PINGPONG_ITERS" -e -c -p "$PORT_SRQ_PINGPONG"
    server_step write_bw vrdma-perf write_bw -d vrdma0 --check -p "$PORT_WRITE_BW"
    server_step write_lat vrdma-perf write_lat -d vrdma0 --check -p "$PORT_WRITE_LAT"
    server_step ib_write_bw env "$shim" ib_write_bw -d vrdma0 -F -p "$PORT_IB_WRITE_BW" -s "$IB_WRITE_BW_SIZE" -n "$IB_WRITE_BW_ITERS"
    if until_ok "$CLIENT_WAIT" fetch_migrate_iters; then
        say "migrate iterations $iters"
        server_step migrate env "$shim" ibv_rc_pingpong -d vrdma0 -g 0 -n "$iters" -c -p "$PORT_MIGRATE"
    else
        say "error: vm2 published no iteration count for the migration step"
        say "step migrate $role skipped: no iteration count"
    fi
else
    client_step rc_pingpong env "$shim" ibv_rc_pingpong -d vrdma0 -g 0 -n "$PINGPONG_ITERS" -c -p "$PORT_PINGPONG" "$peer"
    client_step ud_pingpong env "$shim" ibv_ud_pingpong -d vrdma0 -g 0 -n "$PINGPONG_ITERS" -s "$UD_SIZE" -p "$PORT_UD_PINGPONG" "$peer"
    client_step srq_pingpong env "$shim" ibv_srq_pingpong -d vrdma0 -g 0 -n "$PINGPONG_ITERS" -e -c -p "$PORT_SRQ_PINGPONG" "$peer"
    client_step write_bw vrdma-perf write_bw -d vrdma0 --check -p "$PORT_WRITE_BW" -s "$WRITE_BW_SIZE" -n "$WRITE_BW_ITERS" "$peer"
    client_step write_lat vrdma-perf write_lat -d vrdma0 --check -p "$PORT_WRITE_LAT" -s "$WRITE_LAT_SIZE" -n "$WRITE_LAT_ITERS" "$peer"
    client_step ib_write_bw env "$shim" ib_write_bw -d vrdma0 -F -p "$PORT_IB_WRITE_BW" -s "$IB_WRITE_BW_SIZE" -n "$IB_WRITE_BW_ITERS" "$peer"
    iters=$(migrate_iters)
    set_status migrate_iters "$iters"
    say "migrate iterations $iters"
    client_step migrate env "$shim" ibv_rc_pingpong -d vrdma0 -g 0 -n "$iters" -c -p "$PORT_MIGRATE" "$peer"
fi

say "end $role after $(cut -d' ' -f1 /proc/uptime) s"
poweroff -f
