"""Which C-STORE data phase serves the SCP under test: gateway/_pdata.c (C) or the Python lane.

``make test`` builds the C one (a C compiler is among its system packages), so a test that
asks for it fails, rather than skips, when it was not built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway import store_lane


@dataclass
class DataPhase:
    name: str  # "c" or "python"
    codes: list[int] = field(default_factory=list)  # what each C call returned


def use_data_phase(name: str, monkeypatch: pytest.MonkeyPatch) -> DataPhase:
    phase = DataPhase(name)
    if name == "python":
        monkeypatch.setattr(store_lane, "PDATA_RECEIVE", None)
        return phase
    built = store_lane.PDATA_RECEIVE
    assert built is not None, "gateway/_pdata.c was not built (pip install -e . with a C compiler)"

    def counted(*args: Any) -> int:
        code = built(*args)
        phase.codes.append(code)
        return code

    monkeypatch.setattr(store_lane, "PDATA_RECEIVE", counted)
    return phase


@pytest.fixture(params=["c", "python"])
def data_phase(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> DataPhase:
    """Each test twice: C-STORE data sets read by C, then by the Python lane."""
    return use_data_phase(request.param, monkeypatch)


@pytest.fixture
def c_data_phase(monkeypatch: pytest.MonkeyPatch) -> DataPhase:
    return use_data_phase("c", monkeypatch)
