"""fedexec's services (relay, endpoint agent, pool manager) run with the
collector tuned for them (gcpolicy.py); the client's program and the
workers, which run user code, keep Python's defaults."""

from __future__ import annotations

import gc
import inspect
import subprocess
import sys


def test_for_service_freezes_start_up_objects_and_collects_young_garbage_less_often():
    code = ("import gc; from fedexec.gcpolicy import for_service, YOUNG_THRESHOLD; before = gc.get_threshold(); "
            "for_service(); after = gc.get_threshold(); "
            "assert after == (YOUNG_THRESHOLD, before[1], before[2]), (before, after); "
            "assert gc.get_freeze_count() > 1000, gc.get_freeze_count(); "
            "a = []; a.append(a); del a; "          # cyclic garbage is still collected
            "assert gc.collect() >= 1; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_each_service_main_applies_it_and_user_code_keeps_the_defaults(executor):
    from fedexec.endpoint import __main__ as endpoint_main
    from fedexec.pool import manager
    from fedexec.relay import __main__ as relay_main

    for module in (relay_main, endpoint_main, manager):   # once, after start-up, before serving
        assert inspect.getsource(module.main).count("for_service()") == 1, module.__name__
    default = gc.get_threshold()[0]
    assert default < 20_000   # this (the client's) process is not tuned: it is the user's program
    assert executor.submit(gc.get_threshold).result(60)[0] == default   # nor is a worker
