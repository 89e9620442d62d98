"""Imported by Python at start-up in a process launched by ``atm run`` (and only there).

Installs the manager's hooks (``integrations.inject``), then runs the ``sitecustomize`` this
one shadows, if the environment has one. Any failure leaves the script running unmanaged.
"""

import importlib.util
import os
import sys


def _install() -> None:
    if not os.environ.get("ATM_RUN"):
        return
    try:
        from integrations.inject import install

        install()
    except Exception as exc:  # the script must run even if the manager cannot
        print(f"atm: not managing this process: {exc}", file=sys.stderr)


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        folder = os.path.abspath(entry or os.getcwd())
        candidate = os.path.join(folder, "sitecustomize.py")
        if folder != here and os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_atm_shadowed_sitecustomize", candidate)
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


_install()
_chain()
