"""flush_at_exit: run at exit for owners still alive, never keeping one alive."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref

from flowgate.common.at_exit import flush_at_exit


def test_a_live_owner_is_flushed_at_exit_and_a_dropped_one_is_neither_kept_nor_called():
    script = textwrap.dedent("""
        import gc, weakref
        from flowgate.common.at_exit import flush_at_exit

        class Owner:
            def __init__(self, name):
                self.name = name
            def flush(self):
                print("flushed", self.name, flush=True)

        class Failing:
            def flush(self):
                raise RuntimeError("store gone")

        kept, failing = Owner("kept"), Failing()
        dropped = Owner("dropped")
        flush_at_exit(kept.flush)
        flush_at_exit(failing.flush)
        flush_at_exit(dropped.flush)
        ref = weakref.ref(dropped)
        del dropped
        gc.collect()
        print("dropped is gone:", ref() is None, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.splitlines() == ["dropped is gone: True", "flushed kept"]
    assert "store gone" in out.stderr  # logged; the other flushes still ran


def test_an_owner_dropped_inside_a_cycle_is_not_flushed_and_a_closed_log_stream_stays_quiet():
    script = textwrap.dedent("""
        import gc, io, logging
        from flowgate.common.at_exit import flush_at_exit

        gc.disable()  # the cycle below is still in memory when the process exits
        stream = io.StringIO()
        logging.getLogger().addHandler(logging.StreamHandler(stream))

        class Owner:
            def __init__(self, name):
                self.name, self.me = name, self
            def flush(self):
                print("flushed", self.name, flush=True)
                logging.getLogger("owner").warning("store unreachable")

        kept, cyclic = Owner("kept"), Owner("cyclic")
        flush_at_exit(kept.flush)
        flush_at_exit(cyclic.flush)
        del cyclic
        stream.close()  # like pytest's captured stderr, closed before atexit runs
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.splitlines() == ["flushed kept"]
    assert "Logging error" not in out.stderr, out.stderr


def test_flush_at_exit_holds_no_reference():
    class Owner:
        def flush(self) -> None:
            pass

    owner = Owner()
    flush_at_exit(owner.flush)
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None
