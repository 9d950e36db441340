"""docs/api.md is generated from smcommon.api and the errors, and kept so."""

from __future__ import annotations

from smcommon import api, apidoc, errors
from testenv import REPO


def test_docs_api_md_is_what_the_code_serves() -> None:
    text = (REPO / "docs" / "api.md").read_text()
    assert text == apidoc.render(), (
        "docs/api.md is stale: run `.venv/bin/python -m smcommon.apidoc > docs/api.md`"
    )


def test_every_method_and_error_is_in_the_reference() -> None:
    text = apidoc.render()
    for name in [*api.METHODS, *(m.name for m in api.DISPATCHER_METHODS), "SR.gc", "SR.stat"]:
        assert f"| {name} |" in text
    for cls in errors.SmapiError.__subclasses__():
        assert f"| {cls.wire_name} |" in text and cls.when
