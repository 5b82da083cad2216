"""What a test needs from the machine: in CI a missing server is a failure, elsewhere a skip."""

import os

import pytest


def need_server(binary_found: bool, what: str) -> None:
    """Tests that need a real server fail in CI when it is missing, and skip elsewhere."""
    if binary_found:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is not installed (scripts/install-test-servers installs it as root)")
    pytest.skip(f"{what} is not installed")
