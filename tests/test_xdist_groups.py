"""`make test` (pytest -n 2 --dist loadgroup) runs the tests of one `xdist_group` on one worker,
so that an expensive module-scoped fixture they share is built once (tests/conftest.py)."""

import pytest


@pytest.mark.xdist_group("xdist_groups_check")
def test_a_grouped_test_carries_its_group_under_loadgroup(request):
    if getattr(request.config.option, "loadgroup", False):  # an xdist worker under loadgroup
        assert request.node.nodeid.endswith(
            "::test_a_grouped_test_carries_its_group_under_loadgroup@xdist_groups_check"
        ), request.node.nodeid
    else:  # serial runs (and other --dist modes) keep the plain node id
        assert request.node.nodeid.endswith(
            "::test_a_grouped_test_carries_its_group_under_loadgroup"
        )
