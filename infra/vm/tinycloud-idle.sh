#!/bin/bash
# tinycloud-idle: stop the VM when nobody has used it for TINYCLOUD_IDLE_MINUTES.
#
#   tinycloud-idle start    # at boot (tinycloud-activity.service): count packets, reset clock
#   tinycloud-idle check    # every minute (tinycloud-idle.timer): power off if idle too long
#   sudo touch /var/lib/tinycloud/keep-awake    # never stop while this file exists
#
# "Used" means any of: a job whose run.json says running and whose pid is alive; a packet to
# the SSH or API port since the last check (nftables counters see every request, TGI's inside
# Docker included, since they count before Docker's port forwarding); an open SSH session.
# Powering off from inside stops the instance (its shutdown behaviour is "stop"): billing for
# it ends, the volume and every run stay, and `fab start` (or the console) brings it back.
set -euo pipefail

# shellcheck source=/dev/null
. "${TINYCLOUD_IDLE_ENV:-/etc/tinycloud/idle.env}"

LAST_ACTIVITY="$TINYCLOUD_STATE/last-activity"
PACKETS_SEEN="$TINYCLOUD_STATE/activity-packets"
KEEP_AWAKE="$TINYCLOUD_STATE/keep-awake"
TABLE=tinycloud  # nftables table (family inet) holding the counters

log() {
    logger -t tinycloud-idle -- "$*" || true
    echo "tinycloud-idle: $*"
}

start() {
    mkdir -p "$TINYCLOUD_STATE"
    # Declare, delete and recreate in one transaction: idempotent across restarts.
    nft -f - <<EOF
table inet $TABLE
delete table inet $TABLE
table inet $TABLE {
    chain activity {
        type filter hook prerouting priority -300; policy accept;
        tcp dport 22 counter
        tcp dport $TINYCLOUD_API_PORT counter
    }
}
EOF
    echo 0 >"$PACKETS_SEEN"
    touch "$LAST_ACTIVITY"
}

packets_now() {
    nft list chain inet "$TABLE" activity 2>/dev/null |
        awk '{ for (i = 1; i < NF; i++) if ($i == "packets") total += $(i + 1) } END { print total + 0 }'
}

running_job() {
    # A run is live when run.json says "running" and its pid still exists (SIGKILL leaves
    # "running" behind with a dead pid: that run is over and must not keep the VM up).
    local run_json pid
    for run_json in "$TINYCLOUD_RUNS"/*/run.json; do
        [ -f "$run_json" ] || continue
        pid=$(jq -r 'select(.status == "running") | .pid // empty' "$run_json" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            echo "job $(basename "$(dirname "$run_json")") (pid $pid)"
            return 0
        fi
    done
    return 1
}

busy_reason() {
    local now seen sessions
    if [ -e "$KEEP_AWAKE" ]; then
        echo "$KEEP_AWAKE exists"
        return 0
    fi
    running_job && return 0
    now=$(packets_now)
    seen=$(cat "$PACKETS_SEEN" 2>/dev/null || echo 0)
    echo "$now" >"$PACKETS_SEEN"
    if [ "$now" != "$seen" ]; then
        echo "SSH/API traffic ($((now - seen)) packets)"
        return 0
    fi
    sessions=$(ss -Htn state established '( sport = :22 )' | wc -l)
    if [ "$sessions" -gt 0 ] || [ -n "$(who)" ]; then
        echo "open SSH session"
        return 0
    fi
    if [ -n "$(ss -Htn state established "( sport = :$TINYCLOUD_API_PORT )")" ]; then
        echo "open API connection"
        return 0
    fi
    return 1
}

check() {
    local reason idle_s limit_s
    [ "$TINYCLOUD_IDLE_MINUTES" -gt 0 ] || exit 0
    [ -e "$LAST_ACTIVITY" ] || touch "$LAST_ACTIVITY"
    if reason=$(busy_reason); then
        touch "$LAST_ACTIVITY"
        echo "tinycloud-idle: busy: $reason"
        return 0
    fi
    idle_s=$(($(date +%s) - $(stat -c %Y "$LAST_ACTIVITY")))
    # Users choose minutes (idleStopMinutes, at least 5). The booted-VM tests shorten the limit
    # with a systemd drop-in that sets TINYCLOUD_IDLE_TEST_SECONDS for this unit only.
    limit_s=${TINYCLOUD_IDLE_TEST_SECONDS:-$((TINYCLOUD_IDLE_MINUTES * 60))}
    if [ "$idle_s" -ge "$limit_s" ]; then
        log "idle for $((idle_s / 60)) min (limit $TINYCLOUD_IDLE_MINUTES): powering off"
        systemctl poweroff
    else
        echo "tinycloud-idle: idle for $((idle_s / 60)) of $TINYCLOUD_IDLE_MINUTES min"
    fi
}

case "${1:-}" in
start) start ;;
check) check ;;
*)
    echo "usage: tinycloud-idle start|check" >&2
    exit 2
    ;;
esac
