"""What smctl shows: tables, ``key: value`` lines, sizes, and error lines.

Owns the presentation of SMAPI values for people (``show``), the one-line
explanation of an ErrorDescription (``explain``), and ``human_size``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from smcommon import sizes

human_size = sizes.format


_VDI_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("VDI", "vdi", str),
    ("NAME", "name_label", str),
    ("SIZE", "virtual_size", human_size),
    ("USED", "physical_utilisation", human_size),
    ("RO", "read_only", lambda v: "yes" if v else "no"),
    ("SNAPSHOT", "is_a_snapshot", lambda v: "yes" if v else "no"),
    ("PERSISTENT", "persistent", lambda v: "yes" if v else "no"),
]


def _name_label(v: Any) -> str:
    return str(v.get("name_label", "")) if isinstance(v, dict) else ""


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
        for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def vdi_table(vdis: list[Any]) -> str:
    rows = []
    for v in vdis:
        d = v if isinstance(v, dict) else {"vdi": str(v)}
        rows.append([fmt(d.get(key, "")) for _h, key, fmt in _VDI_COLUMNS])
    return table(rows, [h for h, _k, _f in _VDI_COLUMNS])


_SIZE_KEYS = {
    "virtual_size", "physical_utilisation", "physical_size", "total", "free", "used",
}  # fmt: skip


def key_values(d: dict[str, Any]) -> str:
    width = max((len(k) for k in d), default=0)
    lines = []
    for k, v in d.items():
        if (k in _SIZE_KEYS or k.endswith("_bytes")) and isinstance(v, int):
            v = f"{v} ({human_size(v)})"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True)
        lines.append(f"{k.ljust(width)}  {v}")
    return "\n".join(lines)


def show(command: str, value: Any) -> str:
    if command in ("sr-scan", "vdi-list") and isinstance(value, list):
        # by name; SR.scan lists oldest first, so equal names stay in that order
        return vdi_table(sorted(value, key=_name_label))
    if command == "vdi-similar-content" and isinstance(value, list):
        return vdi_table(value)  # most similar first, as the plugin ranked them
    if command == "status" and isinstance(value, dict):
        return status_text(value)
    if command == "query" and isinstance(value, list):
        rows = [
            [
                str(q.get("driver", "")),
                str(q.get("version", "")),
                str(q.get("name", q.get("error", ""))),
            ]
            for q in value
            if isinstance(q, dict)
        ]
        return table(rows, ["TYPE", "VERSION", "NAME"])
    if value is None or value == "":
        return ""
    if isinstance(value, dict):
        return key_values(value)
    if isinstance(value, list):
        return "\n".join(
            json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
            for v in value
        )
    return str(value)


def _progress(p: Any) -> str:
    if not isinstance(p, dict):
        return ""
    done, total = p.get("done", 0), p.get("total", 0)
    text = f"{p.get('what', '')} {human_size(done)}"
    if isinstance(total, int) and total > 0:
        text += f"/{human_size(total)} {p.get('percent', 0)}%"
    if p.get("rate"):
        text += f" {human_size(int(p['rate']))}/s"
    if p.get("eta") is not None:
        text += f" eta {p['eta']}s"
    return text


def status_text(value: dict[str, Any]) -> str:
    """Dispatcher.status for people: settings, SRs, queues, running calls, lost replies."""
    lists = ("running", "srs", "queues", "unclaimed", "spool")
    head = key_values({k: v for k, v in value.items() if k not in lists})
    parts = [head]
    parts.append(table([[s["sr"], s["type"]] for s in value.get("srs", [])], ["SR", "TYPE"]))
    if value.get("queues"):
        parts.append(
            table(
                [[q["key"], str(q["running"]), str(q["waiting"])] for q in value["queues"]],
                ["QUEUE", "RUNNING", "WAITING"],
            )
        )
    parts.append(
        table(
            [
                [
                    r["dbg"], r["method"], r["sr"], r["plugin"], r.get("state", ""),
                    f"{r['seconds']}s", _progress(r.get("progress")),
                ]
                for r in value.get("running", [])
            ],
            ["DBG", "METHOD", "SR", "PLUGIN", "STATE", "RUNNING", "PROGRESS"],
        )
    )  # fmt: skip
    if value.get("unclaimed"):
        parts.append(
            "unclaimed outcomes (their replies were lost; a retry of the same call gets them):\n"
            + table(
                [[u["dbg"], u["method"], u["sr"], u["outcome"]] for u in value["unclaimed"]],
                ["DBG", "METHOD", "SR", "OUTCOME"],
            )
        )
    return "\n\n".join(parts)


def explain(err: list[str]) -> tuple[str, list[str]]:
    """One clear line for an ErrorDescription, and the detail lines."""
    if not err:
        return "the call failed without a description", []
    name, args = err[0], err[1:]
    a = args + ["?", "?"]
    sentences = {
        "Sr_not_attached": f"SR {a[0]} is not attached",
        "Sr_attached": f"SR {a[0]} is attached (detach it first)",
        "Vdi_does_not_exist": f"VDI {a[0]} does not exist",
        "Illegal_transition": f"illegal datapath transition from {a[0]} to {a[1]}",
        "Unimplemented": f"{a[0]} is not implemented by this SR type",
        "Does_not_exist": f"{a[0]} {a[1]} does not exist",
        "Cancelled": f"the call {a[0]} was cancelled",
        "Redirect": f"resend the call to {a[0]}",
    }
    if name == "Sr_not_attached":
        hint = f"attach it first: smctl sr-attach {a[0]} --type TYPE --path DIR (or -o KEY=VALUE)"
        return f"{name}: {sentences[name]}", [hint]
    if name == "Backend_error":
        code = args[0] if args else "?"
        first = args[1] if len(args) > 1 else ""
        return f"{code}: {first}".rstrip(": "), args[2:]
    return f"{name}: {sentences.get(name, ' '.join(args))}", []
