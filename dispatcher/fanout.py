"""Calls answered by every plugin: ``SR.ls``, ``Query.query`` and ``Query.diagnostics`` on ``/``.

Owns ``fanout(disp, call, body)``: the call runs in every plugin at once (one
registered call, one plugin process per type) and the answers are joined:
``SR.ls`` merges the lists (a plugin that fails is left out and logged; if
every plugin fails the call fails with SR_LS_FAILED), ``Query.query`` lists
every plugin's query_result, ``Query.diagnostics`` joins the dispatcher's and
every plugin's text.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from dispatcher import wire
from dispatcher.replies import backend, describe

log = logging.getLogger(__name__)


def fanout(disp: Any, call: wire.Call, body: bytes) -> bytes:
    types = disp.plugin_types()
    dbg = call.arg.get("dbg") if isinstance(call.arg.get("dbg"), str) else "-"
    results: dict[str, tuple[bytes, wire.Response | None]] = {}
    rec = disp._register(str(dbg) or "-", call.method, "-", "*")

    def one(t: str) -> None:
        results[t] = disp._run_one(rec, t, body)

    try:
        threads = [
            threading.Thread(target=one, args=(t,), daemon=True) for t in types[1:]
        ]
        for th in threads:
            th.start()
        if types:
            one(types[0])
        for th in threads:
            th.join()
    finally:
        disp._unregister(rec)
    if rec.cancel_reason:
        return disp._cancelled(rec)
    if call.method == "SR.ls":
        return _merge_ls(types, results)
    if call.method == "Query.query":
        listing: list[dict[str, Any]] = []
        for t in types:
            out, resp = results[t]
            if (
                resp is not None
                and resp.status == "Success"
                and isinstance(resp.value.get("Value"), dict)
            ):
                listing.append(resp.value["Value"])
            elif resp is not None and resp.status == "Success":
                listing.append(
                    {"driver": t, "error": "the answer is not a query_result"}
                )
            else:
                listing.append(
                    {"driver": t, "error": " ".join(describe(out, resp))}
                )
        return wire.dumps_response(wire.success(listing))
    texts = [disp.diagnostics()]
    for t in types:
        out, resp = results[t]
        if resp is not None and resp.status == "Success":
            texts.append(f"== plugin {t} ==\n{resp.value.get('Value')}")
        else:
            texts.append(
                f"== plugin {t} ==\nfailed: {' '.join(describe(out, resp))}"
            )
    return wire.dumps_response(wire.success("\n".join(texts)))

def _merge_ls(
    types: list[str], results: dict[str, tuple[bytes, wire.Response | None]]
) -> bytes:
    merged: list[str] = []
    failures: list[str] = []
    for t in types:
        out, resp = results[t]
        value = (
            resp.value.get("Value")
            if resp is not None and resp.status == "Success"
            else None
        )
        if isinstance(value, list):
            merged.extend(str(v) for v in value if str(v) not in merged)
        else:
            failures.append(f"{t}: {' '.join(describe(out, resp))}")
    for f in failures:
        log.warning("SR.ls: plugin left out of the merged answer: %s", f)
    if failures and not merged and len(failures) == len(types):
        return backend("SR_LS_FAILED", *failures)
    return wire.dumps_response(wire.success(merged))
