#!/usr/bin/env bash
# Test hosts on one machine: N "hosts" (default 2: hostA, hostB; at most 3), each a network
# namespace with its own hostname (UTS namespace), its own /etc/hosts and ssh client config
# (bind-mounted in a private mount namespace; the real files are untouched) and its own
# sshd, joined by a bridge on a private test subnet (10.77.0.0/24) that exists only inside
# these namespaces: no default route, so no traffic leaves it. Every host's interface is
# named mh0 (horovodrun --network-interface takes one name for all hosts).
#
#   tests/multihost/hosts.sh check        exit 0 if this machine can host them (installing
#                                         sshd if needed), else say why
#   tests/multihost/hosts.sh up [N]       start them; prints the state folder
#   tests/multihost/hosts.sh down         stop everything `up` started, also after a failure
#   tests/multihost/hosts.sh run HOST CMD...   run CMD inside HOST (cwd kept)
#   tests/multihost/hosts.sh link HOST up|down  bring HOST's link up or down (a fault)
#   tests/multihost/hosts.sh pids HOST         the processes running on HOST
#
# State (keys, configs, pids, hostfile) lives in $MH_STATE (default /tmp/hvdllm-mh).
# Needs root, `ip netns`, unshare and nsenter; installs openssh-server when sshd is missing.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # ip, sshd: a test runner's PATH may lack them
STATE=${MH_STATE:-/tmp/hvdllm-mh}
PREFIX=hvdllm-mh
BRIDGE_NS=$PREFIX-br
NAMES=(hostA hostB hostC)

check() {
  [ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)"; return 1; }
  for tool in ip unshare nsenter; do
    command -v "$tool" >/dev/null || { echo "needs $tool"; return 1; }
  done
  ip netns add "$PREFIX-probe" 2>/dev/null || { echo "cannot create network namespaces (ip netns add)"; return 1; }
  ip netns del "$PREFIX-probe"
  install_sshd || { echo "no sshd, and openssh-server could not be installed"; return 1; }
}

install_sshd() {
  [ -x /usr/sbin/sshd ] && return 0
  echo "installing openssh-server (sshd is missing)" >&2
  if ! (apt-get install -y -qq openssh-server >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null && apt-get install -y -qq openssh-server >/dev/null; }); then
    echo "could not install openssh-server" >&2
    return 1
  fi
}

up() {
  local count=${1:-2}
  [ "$count" -ge 2 ] && [ "$count" -le 3 ] || { echo "hosts: 2 or 3, not $count" >&2; exit 2; }
  check >&2 || exit 1
  down >/dev/null 2>&1 || true
  mkdir -p "$STATE" /run/sshd
  chmod 700 "$STATE"
  ssh-keygen -q -t ed25519 -N "" -f "$STATE/id_test" -C hvdllm-multihost
  cp "$STATE/id_test.pub" "$STATE/authorized_keys"
  cat > "$STATE/ssh_config" <<EOF
Host *
  IdentityFile $STATE/id_test
  StrictHostKeyChecking no
  UserKnownHostsFile $STATE/known_hosts
  BatchMode yes
  ServerAliveInterval 5
  ServerAliveCountMax 3
EOF
  {
    echo "127.0.0.1 localhost"
    for i in $(seq 1 "$count"); do echo "10.77.0.$i ${NAMES[$((i - 1))]}"; done
  } > "$STATE/hosts"
  : > "$STATE/hostfile"

  ip netns add "$BRIDGE_NS"
  ip -n "$BRIDGE_NS" link add br0 type bridge
  ip -n "$BRIDGE_NS" link set br0 up
  for i in $(seq 1 "$count"); do
    local name=${NAMES[$((i - 1))]} ns=$PREFIX-$i
    ip netns add "$ns"
    ip link add mh0 netns "$ns" type veth peer name "veth$i" netns "$BRIDGE_NS"
    ip -n "$BRIDGE_NS" link set "veth$i" master br0 up
    ip netns exec "$ns" sh -c "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"  # no link-local noise
    ip -n "$ns" addr add "10.77.0.$i/24" dev mh0
    ip -n "$ns" link set mh0 up
    ip -n "$ns" link set lo up
    ssh-keygen -q -t ed25519 -N "" -f "$STATE/host_key_$name"
    cat > "$STATE/sshd_$name.conf" <<EOF
ListenAddress 10.77.0.$i
HostKey $STATE/host_key_$name
PidFile $STATE/sshd_$name.pid
PermitRootLogin prohibit-password
AuthorizedKeysFile $STATE/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
AcceptEnv *
EOF
    # The host's own hostname, /etc/hosts and ssh client config, in namespaces that its sshd
    # (and everything started through it or `run`) lives in.
    ip netns exec "$ns" unshare --uts --mount --propagation private sh -c "
      hostname $name
      mount --bind $STATE/hosts /etc/hosts
      mount --bind $STATE/ssh_config /etc/ssh/ssh_config
      exec /usr/sbin/sshd -D -f $STATE/sshd_$name.conf" </dev/null >"$STATE/sshd_$name.log" 2>&1 &
    echo "$name slots=2" >> "$STATE/hostfile"
  done
  for i in $(seq 1 "$count"); do  # wait until every sshd answers from the first host
    local name=${NAMES[$((i - 1))]}
    for _ in $(seq 1 50); do
      run hostA ssh -o ConnectTimeout=2 "$name" true 2>/dev/null && continue 2
      sleep 0.2
    done
    echo "sshd on $name did not come up: $(cat "$STATE/sshd_$name.log")" >&2
    exit 1
  done
  echo "$STATE"
}

host_pid() {  # the sshd of host $1: its namespaces are the host
  local pid
  pid=$(cat "$STATE/sshd_$1.pid" 2>/dev/null) || { echo "no host $1 (hosts.sh up first)" >&2; exit 2; }
  echo "$pid"
}

run() {
  local host=$1
  shift
  nsenter -t "$(host_pid "$host")" -n -u -m --wd="$PWD" "$@"
}

namespace() {  # the network namespace of host $1
  local i
  for i in 1 2 3; do
    [ "${NAMES[$((i - 1))]}" = "$1" ] && { echo "$PREFIX-$i"; return; }
  done
  echo "no host $1" >&2
  exit 2
}

link() {
  local ns
  ns=$(namespace "$1")
  ip -n "$ns" link set mh0 "$2"
}

pids() {
  local ns
  ns=$(namespace "$1")
  ip netns pids "$ns"
}

down() {
  # Processes on a host whose link is down linger: end every process in each namespace by
  # pid before deleting it (killing sshd alone would leave its sessions).
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX-" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  for name in "${NAMES[@]}"; do  # Open MPI's session folders of the hosts' daemons (a killed one leaves its own)
    rm -rf "/tmp/ompi.$name".*
  done
  rm -rf "$STATE"
}

case "${1:-}" in
  check) check ;;
  up) shift; up "$@" ;;
  down) down ;;
  run) shift; run "$@" ;;
  link) shift; link "$@" ;;
  pids) shift; pids "$@" ;;
  *) echo "usage: $0 check | up [N] | down | run HOST CMD... | link HOST up|down | pids HOST" >&2; exit 2 ;;
esac
