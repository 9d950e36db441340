"""What every scenario test of the kernel tier is marked with (one boot of
the guest each; see conftest.py)."""

from __future__ import annotations

import pytest

MARKS = [
    pytest.mark.kernel,
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # a cold image build, then the boot
]
