"""The chart, loaded once; each value set rendered once."""

from __future__ import annotations

from collections.abc import Iterator

import helm_python
import pytest

from tests.deploy.chart import CHART_DIR, VALUE_SETS, Rendered, render


@pytest.fixture(scope="session")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, chart: helm_python.Chart) -> Rendered:
    values = VALUE_SETS[request.param]
    return render(chart, values)
