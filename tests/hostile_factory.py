"""A model factory module with import side effects, for the server's factory tests.

Importing it records the importing process's id in the file named by
``$CNP_HOSTILE_SENTINEL`` (when set) and then raises SystemExit, as a hostile or broken
module might: the server must never import it on a request's say-so, and a worker that
imports it because the operator allowed it must fail the job, not hang or die.
"""

import os

_sentinel = os.environ.get("CNP_HOSTILE_SENTINEL")
if _sentinel:
    with open(_sentinel, "a") as handle:
        handle.write(f"{os.getpid()}\n")
raise SystemExit(3)


def make(num_classes: int):  # never reached: the import above exits
    raise AssertionError("unreachable")
