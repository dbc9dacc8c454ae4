"""Run ``banklm`` and SIGKILL it at a named call: the crash harness of the reliability suite.

    python killer.py TARGET WHEN N [SIGNAL] -- banklm-args...

``TARGET`` is ``package.module:function`` or ``package.module:Class.method``; the process sends itself
``SIGNAL`` (``KILL``, the default, or ``STOP`` to freeze it, holding whatever it holds, until the test
kills it) ``WHEN`` (``before`` or ``after``) the ``N``-th call of it. The target is replaced on its
module before ``banklm.cli.main`` runs, so it must be looked up through the module at call time (banklm's
stages import lazily inside functions, so their library calls are). Nothing of this lives in banklm: the
production code has no fault-injection hook.
"""

import functools
import importlib
import os
import signal
import sys


def _patch(target: str, when: str, nth: int, sig: int) -> None:
    module_name, attr_path = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    original = getattr(owner, name)
    calls = {"n": 0}

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth and when == "before":
            os.kill(os.getpid(), sig)
        result = original(*args, **kwargs)
        if calls["n"] == nth and when == "after":
            os.kill(os.getpid(), sig)
        return result

    setattr(owner, name, wrapper)


def main() -> int:
    sep = sys.argv.index("--")
    target, when, nth, *sig = sys.argv[1:sep]
    assert when in ("before", "after"), when
    _patch(target, when, int(nth), getattr(signal, "SIG" + (sig[0] if sig else "KILL")))
    from banklm.cli import main as banklm_main

    return banklm_main(sys.argv[sep + 1:])


if __name__ == "__main__":
    sys.exit(main())
