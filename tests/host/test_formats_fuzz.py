"""A short atheris run of the image-format parser (tests/fuzz/fuzz_formats.py): hostile outer archives must
only ever end in FormatError, and layer ranges must stay inside the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_fuzz_open_image_short_run(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests/fuzz/fuzz_formats.py"),
            "-runs=15000",
            "-max_len=65536",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "FUZZ_CORPUS": str(tmp_path / "corpus")},
    )
    tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
    assert r.returncode == 0, tail
    assert "Done 15000 runs" in r.stderr, tail
    assert not list(tmp_path.glob("crash-*")), tail
