#!/bin/bash
# tinycloud-cap: write down how long the VM runs, and stop it after TINYCLOUD_MAX_RUN_HOURS.
#
#   tinycloud-cap check     # every minute (tinycloud-cap.timer)
#
# The boot log, $TINYCLOUD_STATE/boots.log, has one line per boot: "BOOT_ID START LAST_SEEN"
# (epoch seconds), this boot's line rewritten every minute. EC2 keeps no history of starts and
# stops, so this is what `fab status` sums into the stack's running time.
# The cap: once the VM has run TINYCLOUD_MAX_RUN_HOURS since it last started, even mid-job,
# every running job's process group gets SIGTERM (a job saves a checkpoint and marks itself
# interrupted), up to TINYCLOUD_CAP_GRACE_S seconds to exit, then the VM powers off: it stops,
# and `fab start` then `fab train ... --resume` carries on. 0 hours: no cap, the log only.
set -euo pipefail

# shellcheck source=/dev/null
. "${TINYCLOUD_IDLE_ENV:-/etc/tinycloud/idle.env}"

BOOT_LOG="$TINYCLOUD_STATE/boots.log"
UPTIME_FILE="${TINYCLOUD_UPTIME_FILE:-}" # the tests' clock, in /proc/uptime's format
BOOT_ID_FILE="${TINYCLOUD_BOOT_ID_FILE:-/proc/sys/kernel/random/boot_id}"
GRACE_S="${TINYCLOUD_CAP_GRACE_S:-300}"

log() {
    logger -t tinycloud-cap -- "$*" || true
    echo "tinycloud-cap: $*"
}

record_boot() { # every other boot's line as it was; this boot's with "last seen" = now
    local now=$1 up=$2 id tmp
    id=$(cat "$BOOT_ID_FILE")
    mkdir -p "$TINYCLOUD_STATE"
    tmp=$(mktemp "$BOOT_LOG.XXXXXX")
    if [ -f "$BOOT_LOG" ]; then
        awk -v id="$id" '$1 != id' "$BOOT_LOG" >"$tmp"
    fi
    echo "$id $((now - up)) $now" >>"$tmp"
    chmod 0644 "$tmp"
    mv "$tmp" "$BOOT_LOG"
}

uptime_s() {
    # Seconds since this machine's init (PID 1) started: on EC2, /proc/uptime to a second or
    # two. In a container (the tests' booted stand-in VM) /proc/uptime is the host's, and a
    # host up longer than the cap would have the container powered off at its first check.
    if [ -n "$UPTIME_FILE" ]; then
        awk '{ print int($1) }' "$UPTIME_FILE"
    else
        ps -o etimes= -p 1 | tr -d ' '
    fi
}

job_groups() { # the process group of every live job whose run.json says running
    local run_json pid
    for run_json in "$TINYCLOUD_RUNS"/*/run.json; do
        [ -f "$run_json" ] || continue
        pid=$(jq -r 'select(.status == "running") | .pid // empty' "$run_json" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            ps -o pgid= -p "$pid" | tr -d ' '
        fi
    done | sort -u
}

stop_jobs() { # SIGTERM each job's group, then wait for them all to exit (or the grace to end)
    local groups group waited=0
    groups=$(job_groups)
    for group in $groups; do
        log "asking job group $group to checkpoint and stop (SIGTERM)"
        kill -TERM -- "-$group" 2>/dev/null || true
    done
    for group in $groups; do
        while kill -0 -- "-$group" 2>/dev/null && [ "$waited" -lt "$GRACE_S" ]; do
            sleep 1
            waited=$((waited + 1))
        done
    done
}

check() {
    local now up limit_s
    now=$(date +%s)
    up=$(uptime_s)
    record_boot "$now" "$up"
    limit_s=$((TINYCLOUD_MAX_RUN_HOURS * 3600))
    [ "$limit_s" -gt 0 ] || exit 0
    if [ "$up" -lt "$limit_s" ]; then
        echo "tinycloud-cap: up $((up / 60)) of $((limit_s / 60)) min"
        return 0
    fi
    log "up $((up / 3600)) h, the cap is $TINYCLOUD_MAX_RUN_HOURS h (maxRunHours): stopping"
    stop_jobs
    log "powering off; \`fab start\` brings it back, \`fab train ... --resume\` carries on"
    systemctl poweroff
}

case "${1:-}" in
check) check ;;
*)
    echo "usage: tinycloud-cap check" >&2
    exit 2
    ;;
esac
