"""A shared fleet's devices are held to their limits as devices holding their own copies would be."""


def test_what_a_device_holding_its_own_copies_holds_at_rest_from_the_zygotes_stages():
    """The estimate against devices measured at rest with every process importing for itself (MiB)."""
    from flotilla.targets.shared_fleet import unshared_at_rest

    MiB = 2**20
    runtime, bare = 65.4 * MiB, 6.5 * MiB
    stages = lambda app: {"bare": {"anon": bare}, "runtime": {"anon": runtime}, "warm": {"anon": runtime + app}}  # noqa: E731
    for app, builtin, measured in ((0.7, False, 222), (189.7, False, 424), (189.7, True, 455)):
        assert abs(unshared_at_rest(stages(app * MiB), builtin) / MiB - measured) <= 0.05 * measured
    assert unshared_at_rest({}) is None


def test_a_starting_device_may_hold_its_own_pages_before_they_are_measured():
    from flotilla.targets.shared_fleet import STARTING_OWN, starting_shared

    assert starting_shared(455 * 2**20) == 455 * 2**20 - STARTING_OWN
    assert starting_shared(64 * 2**20) == 0
