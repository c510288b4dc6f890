"""The systemd units, sysusers.d and tmpfiles.d files shipped in systemd/: systemd itself parses them
(systemd-analyze verify, systemd-sysusers/systemd-tmpfiles into a scratch root), and they agree with
`img-helper serve`'s defaults."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from img_helper import protocol as P
from img_helper.cmd_serve import DEFAULT_GROUP, DEFAULT_POOL, DEFAULT_STATE_DIR

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (systemd is optional on the test host)")
    return path


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    need("systemd-analyze")
    # ExecStart must exist for verify: point it at this checkout's console script
    helper = Path(sys.executable).parent / "img-helper"
    (tmp_path / "img-helper.service").write_text(
        (UNITS / "img-helper.service").read_text().replace("/usr/bin/img-helper", str(helper)))
    shutil.copy(UNITS / "img-helper.socket", tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "img-helper.socket"),
                        str(tmp_path / "img-helper.service")], capture_output=True, text=True)
    problems = [ln for ln in r.stderr.splitlines() if "img-helper" in ln]
    assert r.returncode == 0 and not problems, r.stderr


def test_socket_unit_matches_serve_defaults() -> None:
    s = settings("img-helper.socket")
    assert s["ListenStream"] == [P.DEFAULT_SOCKET]
    assert (s["SocketMode"], s["SocketGroup"], s["SocketUser"]) == (["0660"], [DEFAULT_GROUP], ["root"])
    assert s["DirectoryMode"] == ["0750"] and s["Accept"] == ["no"]


def test_service_is_notify_type_and_hardened() -> None:
    s = settings("img-helper.service")
    assert s["Type"] == ["notify"]
    (exec_start,) = s["ExecStart"]
    assert exec_start.split()[:2] == ["/usr/bin/img-helper", "serve"]
    assert f"--pool {DEFAULT_POOL}" in exec_start and f"--state-dir {DEFAULT_STATE_DIR}" in exec_start
    expect = {"DevicePolicy": "closed", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
              "PrivateTmp": "yes", "ProtectHome": "yes", "PrivateMounts": "yes",
              "RestrictAddressFamilies": "AF_UNIX"}
    for k, v in expect.items():
        assert s[k] == [v], k
    assert set(s["DeviceAllow"]) == {"/dev/mapper/control rw", "/dev/loop-control rw",
                                     "block-device-mapper rwm", "block-loop rw"}
    assert set(s["ReadWritePaths"][0].split()) == {DEFAULT_STATE_DIR, str(Path(P.DEFAULT_SOCKET).parent)}
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert {"CAP_SYS_ADMIN", "CAP_MKNOD", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE",
            "CAP_SETFCAP"} <= caps
    assert not caps & {"CAP_NET_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_SETUID", "CAP_SYS_RAWIO"}


def test_sysusers_and_tmpfiles_create_group_and_dirs(tmp_path: Path) -> None:
    need("systemd-sysusers")
    need("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d/img.conf")], check=True,
                   capture_output=True)
    lines = (tmp_path / "etc/group").read_text().splitlines()
    groups = {ln.split(":")[0]: int(ln.split(":")[2]) for ln in lines}
    assert "img" in groups
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "tmpfiles.d/img.conf")],
                   check=True, capture_output=True)
    state, run = (tmp_path / DEFAULT_STATE_DIR.lstrip("/")).lstat(), (tmp_path / "run/img").lstat()
    assert (stat.S_IMODE(state.st_mode), state.st_uid, state.st_gid) == (0o700, 0, 0)
    assert (stat.S_IMODE(run.st_mode), run.st_uid, run.st_gid) == (0o750, 0, groups["img"])
