"""smcommon.log: where a plugin call's log lines go (files are the subject: pyfakefs)."""

from __future__ import annotations

import logging

import pytest
from smcommon import log


@pytest.fixture
def clean_logging():
    yield
    log.shutdown()


def test_log_file_and_its_directories_are_created(fs, clean_logging):
    context = log.setup("/root/var/log/sm/sm.log", "EXTSR")
    context.dbg = "call-7"
    logging.getLogger("smcommon.engine").info("hello %s", "there")
    log.shutdown()
    text = fs.get_object("/root/var/log/sm/sm.log").contents
    assert "EXTSR[" in text and "INFO [call-7] smcommon.engine: hello there" in text


def test_unwritable_log_falls_back_without_failing(fs, clean_logging):
    fs.create_file("/root/var/log")  # a file where the log directory should be
    context = log.setup("/root/var/log/sm/sm.log", "EXTSR")
    logging.getLogger("x").error("still fine")  # no /dev/log here: goes nowhere
    assert context.prog == "EXTSR"
    assert not any(
        getattr(h, "smcommon_call", False) for h in logging.getLogger().handlers
    )


def test_setup_and_shutdown_leave_foreign_handlers_alone(fs, clean_logging):
    foreign = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(foreign)
    try:
        log.setup("/l/sm.log", "P")
        log.setup("/l/sm.log", "P")  # a second setup replaces ours only
        ours = [h for h in root.handlers if getattr(h, "smcommon_call", False)]
        assert len(ours) == 1 and foreign in root.handlers
        log.shutdown()
        assert foreign in root.handlers
        assert not any(getattr(h, "smcommon_call", False) for h in root.handlers)
    finally:
        root.removeHandler(foreign)


def test_lines_are_appended_whole_as_filehandler_wrote_them(fs, clean_logging):
    """LineFile: one write per record, appended, utf-8 with backslashreplace
    (a surrogate from a badly decoded name), call after call."""
    for n, dbg in enumerate(("first", "second")):
        context = log.setup("/root/var/log/sm/sm.log", "EXTSR")
        context.dbg = dbg
        logging.getLogger("smcommon.engine").info("name %s é \udcff", n)
        log.shutdown()
    lines = fs.get_object("/root/var/log/sm/sm.log").byte_contents.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    assert lines[0].endswith("INFO [first] smcommon.engine: name 0 é \\udcff".encode())
    assert lines[1].endswith("INFO [second] smcommon.engine: name 1 é \\udcff".encode())
