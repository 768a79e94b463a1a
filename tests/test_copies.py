"""tests/copies.py: every marked copy is identical to its source; an edited copy is reported with a diff that names
the file and the block, and `--fix` restores it."""
import shutil
import subprocess
import sys
from pathlib import Path

import copies

ROOT = Path(__file__).resolve().parents[1]


def test_every_marked_copy_is_identical_to_its_source():
    assert copies.check() == []
    assert sum(len(copies.copies(ROOT, f)) for f in copies.files(ROOT)) >= 66


def test_an_edited_copy_fails_with_a_diff_and_fix_restores_it(tmp_path):
    for f in copies.files(ROOT):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    original = (tmp_path / "add.py").read_text()
    edited = original.replace('    return os.path.splitext(path)[0] + ".prev.pt"',
                              '    return os.path.splitext(path)[0] + ".old.pt"', 1)
    edited = edited.replace("# Copied from dmd.py: karras_sigmas\n", "# Copied from dmd.py: karras_sigma\n", 1)
    assert edited != original
    (tmp_path / "add.py").write_text(edited)
    tool = [sys.executable, str(ROOT / "tests" / "copies.py"), "--root", str(tmp_path)]
    r = subprocess.run(tool, capture_output=True, text=True)
    assert r.returncode == 1
    assert "add.py:" in r.stdout and "copy of dmd.py: prev_path differs" in r.stdout, r.stdout
    assert '-    return os.path.splitext(path)[0] + ".prev.pt"' in r.stdout
    assert '+    return os.path.splitext(path)[0] + ".old.pt"' in r.stdout
    assert "dmd.py has no top-level definition karras_sigma" in r.stdout and "2 differ" in r.stdout
    (tmp_path / "add.py").write_text(edited.replace("karras_sigma\n", "karras_sigmas\n", 1))
    r = subprocess.run([*tool, "--fix"], capture_output=True, text=True)
    assert r.returncode == 0 and "1 copies rewritten" in r.stdout, r.stdout
    assert (tmp_path / "add.py").read_text() == original
    assert copies.check(tmp_path) == []


def test_a_mark_without_its_definition_is_reported(tmp_path):
    (tmp_path / "dmd.py").write_text("def f():\n    return 1\n")
    (tmp_path / "other.py").write_text("# Copied from dmd.py: f\n\ndef f():\n    return 1\n")
    (problem,) = copies.check(tmp_path)
    assert "other.py:1: copy of dmd.py: f: the mark is not followed by a top-level definition named f" in problem
