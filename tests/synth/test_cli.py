"""`cbp synth` rejects impossible arguments with a one-line error and exit code 2, and never half-writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cbp_platform.cli import main
from cbp_platform.imaging.nifti import sha256_file


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, needle", [
    (["--participants", "0", "--seed", "1"], "--participants must be >= 1"),
    (["--participants", "5", "--seed", "1", "--resolution", "ultra"], "unknown --resolution 'ultra'"),
    (["--participants", "5", "--seed", "1", "--deliveries", "6"], "cannot exceed --participants"),
    (["--participants", "5", "--seed", "1", "--faults", "1.5"], "--faults must be a share"),
    (["--participants", "five", "--seed", "1"], "invalid int value"),
    (["--seed", "1"], "required: --participants"),
])
def test_impossible_arguments(tmp_path, capsys, argv, needle):
    rc, out, err = _run(capsys, "synth", "--data-root", str(tmp_path), *argv)
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "landing").exists() or not any((tmp_path / "landing").iterdir())


def test_unwritable_root(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc, _, err = _run(capsys, "synth", "-n", "2", "--seed", "1", "--data-root", str(blocker / "root"))
    assert rc == 2 and "not writable" in err and len(err.strip().splitlines()) == 1


def test_existing_delivery_is_refused_and_left_intact(tmp_path, capsys):
    args = ["synth", "-n", "3", "-k", "1", "--seed", "5", "--data-root", str(tmp_path), "--workers", "1", "-q"]
    rc, out, _ = _run(capsys, *args)
    assert rc == 0 and "3 participants in 1 deliveries" in out
    before = {p: sha256_file(p) for p in (tmp_path / "landing").rglob("*") if p.is_file()}
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and "delivery id 'sim5-d01' already exists" in err
    after = {p: sha256_file(p) for p in (tmp_path / "landing").rglob("*") if p.is_file()}
    assert before == after
    # --if-absent makes the demo idempotent
    rc, out, _ = _run(capsys, *args, "--if-absent")
    assert rc == 0 and "nothing to do" in out


def test_failure_midway_leaves_no_partial_delivery(tmp_path, monkeypatch):
    from cbp_platform.synth import delivery

    real = delivery._render_and_write
    calls = {"n": 0}

    def flaky(task):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return real(task)

    monkeypatch.setattr(delivery, "_render_and_write", flaky)
    with pytest.raises(OSError, match="disk full"):
        delivery.synthesize(participants=8, deliveries=2, seed=3, data_root=tmp_path, workers=1)
    assert calls["n"] == 5
    assert list((tmp_path / "landing").iterdir()) == []
    assert list((tmp_path / "truth").iterdir()) == []


def test_console_script_end_to_end(tmp_path):
    """The installed `cbp` entry point writes two valid deliveries (as the README shows)."""
    exe = Path(sys.executable).with_name("cbp")
    proc = subprocess.run([str(exe), "synth", "--participants", "6", "--deliveries", "2", "--seed", "1",
                           "--data-root", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for did in ("sim1-d01", "sim1-d02"):
        assert (tmp_path / "landing" / did / "_SUCCESS").exists()
        assert (tmp_path / "truth" / did / "participants.csv").exists()
