"""What memory_check says of a class, from what was measured (pure; the measuring runs in test_memory_e2e)."""

from flotilla.memory_check import ClassNeed, suggest, verdict_line

MiB = 2**20


def _need(limit_mib, rest_mib, message_mib, error=None):
    return ClassNeed("pi", 1, 2, limit_mib * MiB, rest_mib * MiB, None if error else message_mib * MiB, "train",
                     error)


def test_a_class_below_what_one_message_needs_fails_and_is_told_what_to_set():
    c = _need(768, 226, 608)
    assert c.fails and not c.close and c.need == 834 * MiB
    assert verdict_line(c) == ("pi: this app needs ~834 MiB per device (measured: 226 MiB at rest, 608 MiB for one "
                               "train message), the class has 768m: its 2 devices will fail every message; raise "
                               "devices[1].memory to 1g")


def test_within_five_percent_of_the_limit_is_too_close_to_call():
    c = _need(768, 226, 560)  # 786 MiB: 2% over
    assert not c.fails and c.close and "close to its limit" in verdict_line(c)
    ok = _need(1024, 226, 400)
    assert not ok.fails and not ok.close and verdict_line(ok).endswith("the class has 1g")


def test_what_could_not_be_measured_never_refuses():
    c = _need(768, 226, 0, error="the app's ClientApp failed in the probe: KeyError: 'x'")
    assert not c.fails and "could not be measured" in verdict_line(c)


def test_suggested_limits_hold_the_need_with_room():
    assert suggest(834 * MiB) == "1g"
    assert suggest(300 * MiB) == "384m"
    assert suggest(1500 * MiB) == "2g"
