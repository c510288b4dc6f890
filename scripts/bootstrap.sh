#!/bin/bash
# Installs everything img needs on a fresh Debian 12/13 machine, idempotently:
# apt packages, the host sysctl user-mode-linux needs, a .venv with an editable install
# (which compiles helper/csrc into img_helper._native through cffi).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential pkg-config python3-dev python3-venv
  libdevmapper-dev libarchive-dev libzstd-dev libssl-dev libarchive-tools dmsetup
  user-mode-linux kmod e2fsprogs util-linux iproute2 attr acl
  dbus dbus-daemon polkitd pkexec
  mmdebstrap umoci skopeo tar gzip zstd jq
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: apt installing ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then echo "bootstrap: need root to install packages" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# user-mode-linux maps guest memory in many small mappings: the default limit kills guest processes.
if [ "$(id -u)" = 0 ] && [ "$(sysctl -n vm.max_map_count)" -lt 1048576 ]; then
  sysctl -q -w vm.max_map_count=1048576
fi

# The helper's group and the two unprivileged test users (one in the group, one not). Made here, before
# any user-mode-linux guest runs, because guests share /etc with the host but not its file locks.
if [ "$(id -u)" = 0 ]; then
  getent group img >/dev/null || groupadd --system img
  id img-member >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin -G img img-member
  id img-outsider >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin img-outsider
fi

# The venv uses Debian's python (not a per-user pyenv under /root) so unprivileged test users can run it.
PY=/usr/bin/python3
stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
want=$(cat pyproject.toml setup.py helper/native_build.py helper/csrc/* | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c 'import img_helper._native' 2>/dev/null; then
  log=.venv/install.log
  if ! { .venv/bin/pip install -q --upgrade pip setuptools wheel cffi &&
         .venv/bin/pip install -q -e '.[test]'; } >"$log" 2>&1; then
    tail -n 60 "$log" >&2; echo "bootstrap: pip install failed (full log: $log)" >&2; exit 1
  fi
  echo "$want" > "$stamp"
fi
# the tree must be readable by the unprivileged test users
chmod o+rx . 2>/dev/null || true
echo "bootstrap: ok ($(.venv/bin/python -c 'from img_helper.native import native_version; print(native_version())'))"
