"""The benchmark command without its `bench` extra (tqdm, matplotlib): it
runs, writes its records, and says in one line how to get the rest."""

import json
import os
import subprocess
import sys

# Imports of the extra's packages fail in the child, as where they are not installed.
BLOCKED = "import sys; sys.modules.update(tqdm=None, matplotlib=None); "


def run_without_extras(*args, cwd=None):
    code = BLOCKED + "from fastrnn.bench.__main__ import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_help_without_extras():
    result = run_without_extras("--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "Traceback" not in result.stderr


def test_run_without_extras_writes_records_and_says_what_is_missing(tmp_path):
    result = run_without_extras("--device", "cpu", "--cells", "rnn", "--batch", "2", "--hidden", "4",
                                "--steps", "2", "--min-run-time", "0.01", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert 'pip install "fastrnn[bench]"' in result.stderr
    assert "speed-up over torch.nn" in result.stdout
    files = sorted(os.listdir(tmp_path))
    assert [os.path.splitext(f)[1] for f in files] == [".csv", ".json"]
    with open(tmp_path / files[1]) as f:
        assert json.load(f)["records"]
