"""Fixtures shared by every test, and the rules that keep a run honest.

- ``sm_root`` points SM_ROOT (every host path of the storage manager) at a
  fresh tmp directory, so no test touches /run, /var/lib or /var/log.
- ``corpus`` is a fresh copy of the blktap corpus (``tests/vhdcorpus.py``);
  the shared helper modules of tests/ (vhdcorpus, libvhd_style) import.
- The run sees the PATH a fresh machine's CI has (``CI_PATH``), whatever the
  caller's PATH: a test that needs a tool installed by hand, or a script of
  the venv found through PATH, fails here as it would on a fresh machine.
  Scripts of the package are found next to the interpreter (``venv_script``).
- Path SRs may live only under the host's SR roots (``SM_SR_PATHS``,
  ``smcommon.devsafety``): for the run, the roots are pytest's base temporary
  directory (where every test's tmp_path is) and the defaults; tests of the
  roots themselves set their own.
- Under ``CI`` (set by .ci/run's caller), a skipped test fails the run: a tool
  or privilege missing on the CI machine is a set-up bug (scripts/setup), not
  something to pass over.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testenv import CI_PATH, REPO

os.environ["PATH"] = CI_PATH


@pytest.fixture(scope="session", autouse=True)
def sr_roots(tmp_path_factory: pytest.TempPathFactory) -> str:
    roots = f"{tmp_path_factory.getbasetemp().resolve()}:/srv:/var/lib/sm"
    os.environ["SM_SR_PATHS"] = roots
    return roots


@pytest.fixture
def sm_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "smroot"
    root.mkdir()
    monkeypatch.setenv("SM_ROOT", str(root))
    return root


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A directory holding fresh copies of the five blktap corpus images."""
    import vhdcorpus

    return vhdcorpus.extract(tmp_path / "corpus")


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") and _skipped and exitstatus == 0:
        print(
            f"\nCI: {len(_skipped)} test(s) skipped; on CI every test must run "
            "(install what they need in scripts/setup):",
            *_skipped[:20],
            sep="\n  ",
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
