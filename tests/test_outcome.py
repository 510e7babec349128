"""The run's outcome names the devices that never trained, and a class none of whose devices did."""

from flotilla.summary import class_warnings, never_trained

OOM = "Flotilla: the kernel killed the ClientApp at the device's memory limit (768 MiB) before it replied"


def _rounds(n: int) -> list[dict]:
    return [{"round": r, "devices": [
        {"name": "server-1", "class": "server", "status": "ok", "train_s": 1.0},
        {"name": "pi-1", "class": "pi", "status": "failed", "error": OOM},
        {"name": "pi-2", "class": "pi", "status": "failed" if r > 1 else "lost"},
    ]} for r in range(1, n + 1)]


PLAN = {"job": {"devices": [{"name": "server"}, {"name": "pi"}]}}


def _per_device(untrained: dict) -> dict:
    out = {"server-1": {"name": "server-1", "class": "server", "trained_rounds": 3}}
    for name in ("pi-1", "pi-2"):
        out[name] = {"name": name, "class": "pi", "trained_rounds": 0, "untrained_because": untrained[name]}
    return out


def test_devices_that_never_trained_are_named_with_why():
    why = never_trained(_rounds(3), {"pi-2": "its process exited (SIGKILL)"})
    assert why["pi-1"] == OOM.removeprefix("Flotilla: ") + " (3 of 3 messages)"
    assert why["pi-2"] == "lost: its process exited (SIGKILL)"
    assert "server-1" not in why


def test_a_class_that_never_trained_is_a_warning_with_what_to_change():
    warnings = class_warnings(PLAN, _per_device(never_trained(_rounds(3), {"pi-2": "exited"})), 3)
    assert len(warnings) == 1
    assert warnings[0].startswith("class pi: none of its 2 devices trained in 3 rounds: the kernel killed")
    assert "(pi-1)" in warnings[0] and "lost: exited (pi-2)" in warnings[0]
    assert warnings[0].endswith("raise devices[1].memory or make the app use less")


def test_no_warning_when_every_class_trained_or_nothing_did():
    per_device = _per_device({"pi-1": "x", "pi-2": "y"})
    per_device["pi-1"]["trained_rounds"] = 1
    assert class_warnings(PLAN, per_device, 3) == []
    for d in per_device.values():
        d["trained_rounds"] = 0
    assert class_warnings(PLAN, per_device, 3) == []  # the run failed as a whole: its status says so

