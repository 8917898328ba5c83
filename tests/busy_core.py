"""Another process holding one core: a real subprocess spinning on it (the thread
choice's test and bench/threads.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time


@contextlib.contextmanager
def held_core(cpu: int):
    """A busy-looping Python process pinned to `cpu` while the block runs (yielded: its
    `Popen`, to end it sooner)."""
    spin = f"import os; os.sched_setaffinity(0, {{{cpu}}}); print('spinning', flush=True)\nwhile True: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        if spinner.stdout.readline().strip() != "spinning":
            raise RuntimeError(f"the spinning process did not start on CPU {cpu}")
        time.sleep(0.3)  # the scheduler has moved other work off its core
        yield spinner
    finally:
        spinner.kill()
        spinner.wait()
