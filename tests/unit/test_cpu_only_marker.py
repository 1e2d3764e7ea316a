"""``cpu_only`` tests (the CPU redirects of compat.py) are skipped with a
reason where CUDA is present, and run where it is absent."""

import pytest

from tests import conftest


class _Item:
    def __init__(self, cpu_only: bool):
        self.markers = [pytest.mark.cpu_only.mark] if cpu_only else []

    def get_closest_marker(self, name):
        return next((m for m in self.markers if m.name == name), None)

    def add_marker(self, marker):
        self.markers.append(marker.mark)


@pytest.mark.parametrize("cuda", [True, False])
def test_cpu_only_tests_skip_only_on_a_gpu_host(monkeypatch, cuda):
    monkeypatch.setattr(conftest, "_cuda_available", lambda: cuda)
    redirect, other = _Item(cpu_only=True), _Item(cpu_only=False)
    conftest.pytest_collection_modifyitems(None, [redirect, other])
    skip = redirect.get_closest_marker("skip")
    assert (skip is not None) == cuda and other.get_closest_marker("skip") is None
    if cuda:
        assert "CUDA is present" in skip.kwargs["reason"]

