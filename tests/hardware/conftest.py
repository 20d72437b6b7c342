"""The ``tensorrt`` marker, registered here until pytest.ini lists it (--strict-markers refuses an unknown one)."""
from __future__ import annotations


def pytest_configure(config) -> None:
    if not any(line.split(":", 1)[0].strip() == "tensorrt" for line in config.getini("markers")):
        config.addinivalue_line("markers", "tensorrt: needs an NVIDIA GPU, TensorRT's Python bindings and "
                                           "cuda-python (docs/backends.md); skipped with its reason where absent")
