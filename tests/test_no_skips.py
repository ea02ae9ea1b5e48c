"""The skip policy (tests/no_skips.py): a skipped test, an xfail or a module-level importorskip fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "test_skip.py": "import pytest\n\ndef test_a():\n    pytest.skip('no reference here')\n",
    "test_importorskip.py": "import pytest\n\npytest.importorskip('no_such_module_xyz')\n\ndef test_b():\n    pass\n",
    "test_xfail.py": "import pytest\n\n@pytest.mark.xfail(reason='known')\ndef test_c():\n    assert False\n",
    "test_skipif.py": "import pytest\n\n@pytest.mark.skipif(True, reason='never here')\ndef test_d():\n    pass\n",
}


def _pytest(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           str(folder)], cwd=folder, env=env, capture_output=True, text=True, timeout=120)


CONFTEST = "from tests.no_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n"


def test_skips_and_xfails_fail_the_run(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name, text in CASES.items():
        if name != "test_importorskip.py":
            (tmp_path / name).write_text(text)
    (tmp_path / "test_ok.py").write_text("def test_ok():\n    assert True\n")  # passing tests still pass
    done = _pytest(tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    for nodeid in ("test_skip.py::test_a", "test_xfail.py::test_c", "test_skipif.py::test_d"):
        assert f"{nodeid} was skipped (" in out, (nodeid, out)
    summary = out.splitlines()[-1]
    assert "2 failed, 1 passed, 1 error" in summary and "skipped" not in summary and "xfailed" not in summary, out


def test_a_module_level_importorskip_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_importorskip.py").write_text(CASES["test_importorskip.py"])
    done = _pytest(tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "test_importorskip.py was skipped (" in out, out
    assert "no_such_module_xyz" in out and "skipped" not in out.splitlines()[-1], out
