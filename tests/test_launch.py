"""A launched command releases its process group at exit (jat/runtime.py `release_at_exit`)."""

import subprocess
import sys
import textwrap

from helpers import CHILD_ENV, ROOT

# A one-process gloo group; the check is registered first, so it runs last (atexit is last in, first out)
# and sees the group as the interpreter is about to finalise.
CHILD = textwrap.dedent("""
    import atexit, sys, tempfile
    import torch.distributed as dist
    from jat.runtime import release_at_exit

    def check():
        print("initialized at exit:", dist.is_initialized(), flush=True)

    atexit.register(check)
    store = dist.FileStore(tempfile.mktemp(), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    for _ in range(int(sys.argv[1])):
        release_at_exit()
    print("initialized before exit:", dist.is_initialized(), flush=True)
""")


def run_child(registrations: int) -> str:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(registrations)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_process_group_is_destroyed_before_the_interpreter_finalises():
    """Without the release a launched process that returns leaves gloo's threads to be torn down with the
    interpreter, which aborts it about one exit in three (SIGABRT, reported by the launcher as a failed
    run). Registered twice (process_state, then the trainer's Accelerator), it destroys the group once."""
    assert run_child(0).split("\n")[:2] == ["initialized before exit: True", "initialized at exit: True"]
    for registrations in (1, 2):
        assert run_child(registrations).split("\n")[:2] == ["initialized before exit: True",
                                                            "initialized at exit: False"]
