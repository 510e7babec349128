"""The watchdog's rules: stopped, thrashing and hung devices, from kernel samples (no fleet needed)."""

from flotilla.watchdog import HANG_S, HUNG_MIN_S, THRASH_S, Health, MiB, Watchdog, advice


def feed(w: Watchdog, samples, since=None, device="pi-1"):
    out = None
    for h in samples:
        out = w.observe(device, h, since)
        if out:
            return h.t, out
    return None, out


def test_a_device_whose_processes_stay_stopped_is_reported_after_the_hang_time():
    w = Watchdog()
    t, why = feed(w, [Health(t=float(i) / 2, stopped=True, cpu_s=1.0) for i in range(30)])
    assert why and "stopped" in why
    assert HANG_S <= t <= HANG_S + 1


def test_a_short_stop_is_not_a_hang():
    w = Watchdog()
    samples = [Health(t=float(i), stopped=i < 3, cpu_s=float(i)) for i in range(20)]
    assert feed(w, samples)[1] is None


def test_memory_at_the_limit_with_page_faults_and_a_message_out_is_thrashing():
    w = Watchdog()
    limit = 768 * MiB
    samples = [Health(t=float(i), stopped=False, cpu_s=float(i) * 0.1, memory=limit - MiB, limit=limit,
                      limit_hits=100 + i, major_faults=1000 * i) for i in range(20)]
    t, why = feed(w, samples, since=0.0)
    assert why.startswith("thrashing") and "767 of 768 MiB" in why
    assert THRASH_S <= t <= THRASH_S + 1
    assert "raise devices[1].memory" in advice(why, 1, limit)


def test_a_full_but_quiet_device_or_one_with_no_message_out_is_not_thrashing():
    limit = 768 * MiB
    quiet = [Health(t=float(i), stopped=False, cpu_s=float(i), memory=limit - MiB, limit=limit) for i in range(20)]
    assert feed(Watchdog(), quiet, since=0.0)[1] is None  # no faults, no limit hits: just a full cache
    busy = [Health(t=float(i), stopped=False, cpu_s=float(i), memory=limit, limit=limit, major_faults=1000 * i)
            for i in range(20)]
    assert feed(Watchdog(), busy, since=None)[1] is None  # nothing asked of it: it may page as it likes


def test_no_cpu_progress_with_a_long_outstanding_message_is_hung():
    w = Watchdog()
    for _ in range(3):
        w.reply_time("pi-1", 2.0)
    samples = [Health(t=float(i), stopped=False, cpu_s=5.0) for i in range(int(HUNG_MIN_S) + 5)]
    t, why = feed(w, samples, since=0.0)
    assert why and why.startswith("no progress")
    assert t >= HUNG_MIN_S


def test_a_slow_but_working_device_is_never_hung():
    w = Watchdog()
    samples = [Health(t=float(i), stopped=False, cpu_s=0.1 * i) for i in range(200)]
    assert feed(w, samples, since=0.0)[1] is None


def test_a_device_working_at_a_tiny_quota_is_not_hung_but_one_idle_under_it_is():
    # local.fit_cpus may scale a limit to 0.001 CPU: a device busy at its whole quota uses less than IDLE_CPU
    working = [Health(t=float(i), stopped=False, cpu_s=0.001 * i, cpus=0.001) for i in range(200)]
    assert feed(Watchdog(), working, since=0.0)[1] is None
    assert feed(Watchdog(), [Health(t=h.t, stopped=False, cpu_s=h.cpu_s) for h in working], since=0.0)[1]  # no quota
    idle = [Health(t=float(i), stopped=False, cpu_s=0.0001 * i, cpus=0.001) for i in range(200)]
    assert feed(Watchdog(), idle, since=0.0)[1].startswith("no progress")
