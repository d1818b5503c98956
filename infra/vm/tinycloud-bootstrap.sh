#!/bin/bash
# tinycloud-bootstrap: the first-boot set-up cloud-init runs once (runcmd), as root.
#
#   sudo /usr/local/sbin/tinycloud-bootstrap      # safe to run again by hand
#
# Installs Docker (unless the image has it) and uv, makes the runs directory, starts the idle
# auto-stop, and writes the ready marker last: `fab setup` waits for `cloud-init status --wait`
# and then checks that marker, so a half-done bootstrap is never mistaken for a ready VM.
set -euo pipefail

# shellcheck source=/dev/null
. "${TINYCLOUD_IDLE_ENV:-/etc/tinycloud/idle.env}"

SYSTEM_ENV="${TINYCLOUD_SYSTEM_ENV:-/etc/environment}"  # read by PAM for every SSH session
export DEBIAN_FRONTEND=noninteractive
apt_install() {
    # unattended-upgrades may hold the lock on a fresh VM: wait for it rather than fail.
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "$@"
}

# Docker: the Deep Learning AMI ships Docker with the NVIDIA runtime; plain Ubuntu gets docker.io.
if ! command -v docker >/dev/null 2>&1; then
    apt_install docker.io
    # Debian 13 ships the client apart from the engine (Ubuntu's docker.io carries both).
    command -v docker >/dev/null 2>&1 || apt_install docker-cli
fi
systemctl enable --now docker
usermod -aG docker "$TINYCLOUD_USER"

# uv, for the job environment `fab setup` builds (Ubuntu has no package for it); 0.8 or later
# takes --torch-backend without --preview.
if ! command -v uv >/dev/null 2>&1; then
    python3 -m venv /opt/tinycloud-uv
    /opt/tinycloud-uv/bin/pip install --quiet --disable-pip-version-check 'uv>=0.8,<1'
    ln -sf /opt/tinycloud-uv/bin/uv /usr/local/bin/uv
fi

if [ "$TINYCLOUD_GPU" = "1" ]; then
    nvidia-smi -L  # a GPU host without a working driver should fail here, loudly
fi

# The runs directory lives on the big root volume and survives stop/start.
install -d -o "$TINYCLOUD_USER" -g "$TINYCLOUD_USER" "$(dirname "$TINYCLOUD_RUNS")" "$TINYCLOUD_RUNS"
if ! grep -qs '^TINYCLOUD_RUNS=' "$SYSTEM_ENV"; then
    echo "TINYCLOUD_RUNS=$TINYCLOUD_RUNS" >>"$SYSTEM_ENV"
fi

# Idle auto-stop: count SSH/API packets from now on, then check once a minute.
install -d -m 0755 "$TINYCLOUD_STATE"
systemctl daemon-reload
systemctl enable --now tinycloud-activity.service
if [ "$TINYCLOUD_IDLE_MINUTES" -gt 0 ]; then
    systemctl enable --now tinycloud-idle.timer
fi
systemctl enable --now tinycloud-cap.timer # the boot log, and the maxRunHours cap

date -u +%Y-%m-%dT%H:%M:%SZ >"$TINYCLOUD_STATE/ready"
echo "tinycloud-bootstrap: ready"
