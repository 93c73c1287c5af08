"""Children that die with their parent: Linux's parent-death signal (prctl PR_SET_PDEATHSIG).

A `celery worker` started by `local` (or by a test) must not outlive a parent that was killed
(SIGKILL, the OOM killer): nothing would stop it any more, and it would go on taking tasks. The
kernel sends the child its signal when the *thread* that started it exits, not the whole process,
so start such children from a thread that lives as long as they should (`local` runs its loop in
the main thread). The setting survives `exec`, so it holds for the program the child runs.

billiard (Celery's) has `set_pdeathsig`, which Celery calls in its prefork children, but it loads
libc (or parses a cffi declaration) on every call: between fork and exec in the child of a parent
with threads that can deadlock on a lock another thread held at the fork. Here `prctl` is looked
up in the parent, and the child only calls it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` that has the child sent `sig` when the calling thread
    ends; None where the system has no parent-death signal (not Linux): no child is refused for that."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died between the fork and now: nobody will send it
            os.kill(os.getpid(), sig)

    return arm
