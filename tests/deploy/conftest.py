"""A real Prometheus scraping the session's gunicorn, shared by the Prometheus and
dashboard tests, and the real test digits they send."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.deploy.prometheus import PROMETHEUS, start_prometheus, stop_prometheus
from tests.restyle import encode


@pytest.fixture(scope="session")
def prometheus(server, tmp_path_factory):
    """Debian's prometheus on deploy/prometheus/'s config, scraping ``server`` every second."""
    if not PROMETHEUS.exists():
        pytest.skip("Debian's prometheus is not installed (make system-tools installs it)")
    running = start_prometheus(server.url.removeprefix("http://"),
                               tmp_path_factory.mktemp("prometheus"))
    yield running
    stop_prometheus(running)


@pytest.fixture(scope="session")
def digit_pngs(mnist) -> list[bytes]:
    """The first 32 real test digits, as 28×28 PNG files."""
    return [encode(Image.fromarray(digit), "PNG") for digit in mnist.x_test[:32]]

