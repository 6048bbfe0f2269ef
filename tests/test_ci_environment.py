"""Where CI runs (CI=true: root, set up by dev.sh), the emulated board and cgroups work, so the tests that
need them run instead of skipping in silence (on a fresh machine binfmt once left every board test skipped)."""

import os

import pytest

from edgetvm.runtime import cgroup, emulated_board

in_ci = pytest.mark.skipif(os.environ.get("CI") != "true", reason="checks CI's machine (CI=true)")


@in_ci
def test_the_emulated_board_is_available_in_ci():
    assert emulated_board.board_unavailable_reason() is None


@in_ci
def test_cgroups_are_available_in_ci():
    assert cgroup.unavailable_reason() is None
