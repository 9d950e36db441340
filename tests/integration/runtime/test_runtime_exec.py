"""The plugin runtime as a real executable: toysr.py (beside this file) run
with this interpreter, one process per call, as the toolstack runs plugins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import xmlrpc.client
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from smcommon import api

pytestmark = pytest.mark.integration

TOYSR = Path(__file__).resolve().parent / "toysr.py"
GiB = 1 << 30


class Reply:
    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr.decode("utf-8", "replace")

    def body(self) -> dict:
        """The response struct; every wire reply is exactly one methodResponse."""
        assert self.rc == 0, self.err
        assert b"Traceback" not in self.out
        (body,), method = xmlrpc.client.loads(self.out.decode("utf-8"))
        assert method is None and isinstance(body, dict)
        assert body["Status"] in ("Success", "Failure"), body
        return body


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, SM_ROOT=str(tmp_path))
    e.pop("SM_STDIN_TIMEOUT", None)
    return e


def toysr(env, *args: str, stdin: bytes = b"", timeout: float = 60) -> Reply:
    proc = subprocess.run(
        [sys.executable, str(TOYSR), *args],
        input=stdin,
        env=env,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return Reply(proc)


def request(method: str, **params: object) -> bytes:
    return xmlrpc.client.dumps((params,), method).encode()


def test_query_on_stdin(env):
    body = toysr(env, stdin=request("Query.query", dbg="t")).body()
    assert body["Status"] == "Success"
    assert body["Value"]["driver"] == "toy"
    assert body["Value"]["configuration"] == {"path": "a directory"}


def test_request_as_first_argument(env):
    body = toysr(env, request("SR.ls", dbg="t").decode()).body()
    assert body == {"Status": "Success", "Value": ["sr1", "sr2"]}


def _valid_params(method: api.Method) -> dict[str, object]:
    # xmlrpc.client cannot write ints past 32 bits: int64 goes as a decimal string
    samples = {
        "string": "x",
        "key": "k1",
        "int64": str(1 << 33),
        "bool": True,
        "map": {},
    }
    params: dict[str, object] = {}
    for name, arg in method.inputs.items():
        params[name] = {"vdi_info": {"vdi": "v", "virtual_size": str(1 << 33)}}.get(
            name, samples.get(arg.type.kind)
        )
    return params


def test_every_smapi_method_gets_a_well_formed_answer(env):
    """Methods toysr implements answer Success, the others Unimplemented."""
    implemented = {
        "Query.query",
        "Query.diagnostics",
        "SR.ls",
        "VDI.create",
        "VDI.stat",
        "VDI.destroy",
    }

    def one(method: api.Method) -> dict:
        req = xmlrpc.client.dumps((_valid_params(method),), method.name).encode()
        return toysr(env, stdin=req).body()

    with ThreadPoolExecutor(max_workers=6) as pool:
        bodies = dict(
            zip(api.METHODS, pool.map(one, api.METHODS.values()), strict=True)
        )
    for name, body in bodies.items():
        if name in implemented:
            assert body["Status"] == "Success", (name, body)
        else:
            assert body == {
                "Status": "Failure",
                "ErrorDescription": ["Unimplemented", name],
            }


def test_int64_outputs_are_i8(env):
    r = toysr(env, stdin=request("VDI.stat", dbg="t", sr="s", vdi="v"))
    assert b"<name>virtual_size</name><value><i8>10737418240</i8></value>" in r.out
    assert b"<name>physical_utilisation</name><value><i8>0</i8></value>" in r.out
    assert r.body()["Value"]["virtual_size"] == 10 * GiB


def test_int64_input_as_i8(env):
    req = (
        b"<?xml version='1.0'?><methodCall><methodName>VDI.create</methodName><params><param>"
        b"<value><struct><member><name>dbg</name><value>t</value></member>"
        b"<member><name>sr</name><value>s</value></member>"
        b"<member><name>vdi_info</name><value><struct><member><name>name_label</name>"
        b"<value>d0</value></member><member><name>virtual_size</name><value><i8>21474836481"
        b"</i8></value></member></struct></value></member></struct></value>"
        b"</param></params></methodCall>"
    )
    value = toysr(env, stdin=req).body()["Value"]
    assert value["virtual_size"] == 20 * GiB + (
        2 << 20
    )  # the driver rounds up to 2 MiB
    assert value["vdi"] == "v-d0"


ENTITY_ATTACK = b"""<!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<methodCall><methodName>&x;</methodName></methodCall>"""


@pytest.mark.parametrize(
    ("stdin", "code", "text"),
    [
        (b"", "INVALID_REQUEST", "empty"),
        (b"\x00\xff\xfe garbage", "INVALID_REQUEST", "not well-formed XML"),
        (
            b"<methodCall><methodName>x</methodName>",
            "INVALID_REQUEST",
            "not well-formed",
        ),
        (ENTITY_ATTACK, "INVALID_REQUEST", "DOCTYPE"),
        (request("VDI.explode", dbg="t"), "UNKNOWN_METHOD", "VDI.explode"),
        (
            request("VDI.stat", dbg="t", sr="s"),
            "INVALID_REQUEST",
            "missing argument 'vdi'",
        ),
        (
            request("VDI.stat", dbg="t", sr="s", vdi="v", x=1),
            "INVALID_REQUEST",
            "unexpected argument 'x'",
        ),
        (
            request("VDI.stat", dbg="t", sr="s", vdi=["v"]),
            "INVALID_REQUEST",
            "argument vdi must be a string",
        ),
        (
            request("VDI.stat", dbg="t", sr="..", vdi="v"),
            "INVALID_REQUEST",
            "argument sr '..'",
        ),
        (b"x" * (3 << 20), "INVALID_REQUEST", "larger than"),
    ],
    ids=[
        "empty",
        "garbage",
        "truncated",
        "entity",
        "unknown-method",
        "missing-arg",
        "extra-arg",
        "mistyped-arg",
        "bad-key",
        "huge",
    ],
)
def test_malformed_input_gets_a_failure_naming_the_problem(env, stdin, code, text):
    r = toysr(env, stdin=stdin)
    desc = r.body()["ErrorDescription"]
    assert desc[:2] == ["Backend_error", code]
    assert text in desc[2]
    assert "Traceback" not in r.err


def test_errors_of_the_driver(env):
    body = toysr(env, stdin=request("VDI.stat", dbg="t", sr="s", vdi="missing")).body()
    assert body["ErrorDescription"] == ["Vdi_does_not_exist", "missing"]
    r = toysr(env, stdin=request("VDI.destroy", dbg="bug-dbg", sr="s", vdi="bug"))
    assert r.body()["ErrorDescription"][:2] == ["Backend_error", "INTERNAL_ERROR"]
    assert "Traceback" not in r.err  # the traceback goes to the log only
    log = (Path(env["SM_ROOT"]) / "var/log/sm/sm.log").read_text()
    assert "ZeroDivisionError: division by zero" in log and "[bug-dbg]" in log
    body = toysr(
        env, stdin=request("VDI.stat", dbg="t", sr="s", vdi="badresult")
    ).body()
    assert body["ErrorDescription"][:2] == ["Backend_error", "INTERNAL_ERROR"]


def test_stray_output_of_driver_and_children_never_reaches_stdout(env):
    r = toysr(env, stdin=request("VDI.destroy", dbg="t", sr="s", vdi="noisy"))
    assert r.body() == {"Status": "Success", "Value": None}
    assert r.out.startswith(b"<?xml") and r.out.count(b"<methodResponse>") == 1
    assert "stray output from the driver" in r.err
    assert "stray output from a child" in r.err


def test_stdin_never_closed_does_not_hang(env):
    env["SM_STDIN_TIMEOUT"] = "1"
    proc = subprocess.Popen(
        [sys.executable, str(TOYSR)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"<methodCall><methodName>SR.ls")
        proc.stdin.flush()
        out = proc.stdout.read()  # the plugin answers and exits with stdin still open
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()
    (body,), _ = xmlrpc.client.loads(out.decode())
    assert body["ErrorDescription"][:2] == ["Backend_error", "INVALID_REQUEST"]
    assert "no complete request on stdin within 1s" in body["ErrorDescription"][2]


def test_kill_9_mid_call_leaves_nothing_running(env):
    proc = subprocess.Popen(
        [sys.executable, str(TOYSR)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(request("VDI.destroy", dbg="t", sr="s", vdi="slow"))
        proc.stdin.close()
        assert proc.stderr.readline() == b"slow: sleeping\n"  # inside the driver now
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    assert not psutil.pid_exists(proc.pid)
    assert not [
        c
        for c in psutil.Process().children(recursive=True)
        if "toysr" in " ".join(c.cmdline())
    ]
    # the next call is served as usual
    assert toysr(env, stdin=request("SR.ls", dbg="t")).body()["Status"] == "Success"


def test_parallel_calls(env):
    def one(i: int) -> dict:
        return toysr(
            env, stdin=request("VDI.stat", dbg=f"par-{i}", sr="s", vdi=f"v{i}")
        ).body()

    with ThreadPoolExecutor(max_workers=12) as pool:
        bodies = list(pool.map(one, range(24)))
    assert [b["Value"]["vdi"] for b in bodies] == [f"v{i}" for i in range(24)]
    log = (Path(env["SM_ROOT"]) / "var/log/sm/sm.log").read_text().splitlines()
    for i in range(24):
        assert (
            sum(f"[par-{i}] smcommon.plugin: VDI.stat sr=s: ok in" in x for x in log)
            == 1
        )


def test_by_hand_form(env):
    r = toysr(
        env,
        "VDI.create",
        "sr=s",
        'vdi_info={"name_label": "d0", "virtual_size": "10G"}',
    )
    assert r.rc == 0, r.err
    value = json.loads(r.out)
    assert value["virtual_size"] == 10 * GiB and value["vdi"] == "v-d0"
    r = toysr(env, "VDI.stat", "sr=s", "vdi=missing")
    assert r.rc == 1 and r.out == b""
    assert r.err.strip().endswith("VDI.stat: Vdi_does_not_exist missing")
    r = toysr(env, "--json", "SR.gc", "sr=s")
    assert r.rc == 0
    assert json.loads(r.out)["Value"] == {"sr": "s", "deleted": 3, "bytes": 5 * GiB}


def test_help(env):
    r = toysr(env, "--help")
    assert r.rc == 0
    text = r.out.decode()
    assert "VDI.create sr=<key> vdi_info=<vdi_info>  -> vdi_info" in text
    assert "SR.gc sr=<key>  -> any" in text
    r = toysr(env, "VDI.attach", "--help")
    assert r.rc == 0 and b"read_write" in r.out and b"xenstore_data" in r.out


def test_verbose_logs_to_stderr_and_every_call_to_the_log_file(env):
    r = toysr(env, "-v", stdin=request("SR.ls", dbg="loud"))
    assert r.body()["Status"] == "Success"
    assert "[loud] smcommon.plugin: SR.ls: ok in" in r.err
    log = (Path(env["SM_ROOT"]) / "var/log/sm/sm.log").read_text()
    assert "[loud] smcommon.plugin: SR.ls: ok in" in log


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_closed_standard_descriptors(env, closed):
    """Started with stdin, stdout or stderr closed: still exits 0, no traceback."""
    req = request("SR.ls", dbg="t")
    feed = subprocess.PIPE if closed != 0 else None
    proc = subprocess.Popen(
        [sys.executable, str(TOYSR)],
        stdin=feed,
        stdout=subprocess.PIPE if closed != 1 else None,
        stderr=subprocess.PIPE if closed != 2 else None,
        env=env,
        pass_fds=(),
        preexec_fn=lambda: os.close(closed),  # noqa: PLW1509 -- a single-threaded child
    )
    out, err = proc.communicate(req if closed != 0 else None, timeout=60)
    assert proc.returncode == 0
    assert b"Traceback" not in (err or b"")
    if out is not None:
        (body,), _ = xmlrpc.client.loads(out.decode())
        expected = (
            "Failure" if closed == 0 else "Success"
        )  # closed stdin = empty request
        assert body["Status"] == expected
