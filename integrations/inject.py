"""Zero-code supervision: what ``atm run -- CMD`` switches on inside the launched process.

``atm run`` puts ``integrations/autoinject`` (which holds a ``sitecustomize.py``) first on
``PYTHONPATH`` and passes its options in the ``ATM_RUN`` environment variable. Python imports
``sitecustomize`` at start-up; it calls :func:`install`, which registers post-import hooks (the
way ``opentelemetry-instrument`` and ``ddtrace-run`` work), so each framework is patched when,
and only if, the script imports it:

- ``transformers.trainer``: every ``Trainer`` gets the manager's callback;
- ``stable_baselines3.common.base_class``: every ``learn()`` gets the manager's callback, and
  SB3's own training metrics go to the tracker run;
- ``lightning.pytorch`` and ``pytorch_lightning``: every Lightning ``Trainer`` gets the
  manager's callback, bound to the run of its MLflow or W&B logger;
- ``torch.optim``: for hand-written loops, a global optimizer step pre-hook manages the first
  optimizer that steps (its lr, weight decay, and the lr schedulers built on it), unless a
  Trainer or an SB3 algorithm is already managing the process; it says once, by name, when
  the loop logs to no run it can find;
- ``accelerate.accelerator``: an Accelerate loop is such a loop; when the Accelerator's
  trackers give no run the manager reads, it says so once.

Each integration finds the run the script logs to (the tracker backend says how: MLflow's
active run, or ``MLFLOW_RUN_ID``) when training starts, marks it managed and publishes its
knobs. Without ``ATM_RUN`` none of this runs: importing this package changes nothing, starts
no thread and hooks nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from integrations import session
from integrations.session import ENV, InjectConfig

if TYPE_CHECKING:
    from integrations.protocol import Boundary

log = logging.getLogger("integrations.inject")

__all__ = ["ENV", "InjectConfig", "install"]


def install(config: InjectConfig | None = None) -> None:
    """Install the post-import hooks; called by ``sitecustomize`` under ``atm run`` only."""
    if session.current() is not None:
        return
    if config is None:
        raw = os.environ.get(ENV)
        if not raw:
            return
        config = InjectConfig.from_env(raw)
    session.start(config)
    hooks: dict[str, Callable[[ModuleType], None]] = {
        "transformers.trainer": _patch_trainer,
        "stable_baselines3.common.base_class": _patch_sb3,
        "torch.optim.optimizer": _patch_torch_optimizer,
        "torch.optim.lr_scheduler": _patch_torch_schedulers,
        "lightning.pytorch.trainer.trainer": _patch_lightning,
        "pytorch_lightning.trainer.trainer": _patch_lightning,
        "accelerate.accelerator": _patch_accelerate,
    }
    finder = _PostImportFinder(hooks)
    sys.meta_path.insert(0, finder)
    for name in hooks:
        module = sys.modules.get(name)
        if module is not None:
            finder.run_hook(name, module)


# ---- post-import hooks ------------------------------------------------------------------


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, after: Callable[[ModuleType], None]):
        self.loader = loader
        self.after = after

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.after(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs a hook right after one of the named modules has been executed."""

    def __init__(self, hooks: dict[str, Callable[[ModuleType], None]]) -> None:
        self.hooks = hooks

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _HookedLoader(
                        spec.loader, lambda module: self.run_hook(fullname, module)
                    )
                return spec
        return None

    def run_hook(self, name: str, module: ModuleType) -> None:
        # A failing hook must never break the script's import: the run goes on unmanaged.
        try:
            self.hooks[name](module)
        except Exception:
            log.warning("atm: could not hook %s; it runs unmanaged", name, exc_info=True)


def _config() -> InjectConfig:
    current = session.current()
    assert current is not None
    return current.config


def _boundary(default: Boundary, allowed: tuple[Boundary, ...]) -> Boundary:
    from integrations.protocol import Boundary

    if _config().apply_at is None:
        return default
    wanted = Boundary(_config().apply_at)
    if wanted not in allowed:
        log.warning("atm: --apply-at %s does not apply here; using %s", wanted, default)
        return default
    return wanted


def _patch_trainer(module: ModuleType) -> None:
    trainer_cls = module.Trainer
    original_init = trainer_cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        from integrations.hf import ManagerCallback
        from integrations.protocol import Boundary

        current = session.current()
        if current is None:
            return
        callbacks = self.callback_handler.callbacks
        if not any(isinstance(c, ManagerCallback) for c in callbacks):
            config = _config()
            self.add_callback(
                ManagerCallback(
                    objective=config.objective,
                    poll_interval=config.poll_interval,
                    apply_at=_boundary(Boundary.STEP, (Boundary.STEP, Boundary.EVAL)),
                    bounds=config.bounds,
                    trainer=self,
                )
            )
        current.claim(ManagerCallback.framework)

    trainer_cls.__init__ = __init__


def _patch_sb3(module: ModuleType) -> None:
    # Every algorithm defines its own learn(); all of them go through _init_callback.
    algorithm_cls = module.BaseAlgorithm
    original_init_callback = algorithm_cls._init_callback

    def _init_callback(self: Any, callback: Any, *args: Any, **kwargs: Any) -> Any:
        current = session.current()
        if current is not None:
            from stable_baselines3.common.callbacks import (
                BaseCallback,
                CallbackList,
                ConvertCallback,
            )

            from integrations.protocol import Boundary
            from integrations.sb3 import ManagerSB3Callback

            current.claim(ManagerSB3Callback.framework)
            if _contains(callback, ManagerSB3Callback):
                return original_init_callback(self, callback, *args, **kwargs)
            config = _config()
            ours = ManagerSB3Callback(
                objective=config.objective,
                poll_interval=config.poll_interval,
                apply_at=_boundary(Boundary.ROLLOUT, (Boundary.ROLLOUT, Boundary.EVAL)),
                bounds=config.bounds,
                log_to_tracker=True,
            )
            if callback is None:
                callback = ours
            elif isinstance(callback, list):
                callback = [*callback, ours]
            elif isinstance(callback, BaseCallback):
                callback = CallbackList([callback, ours])
            else:
                callback = CallbackList([ConvertCallback(callback), ours])
        return original_init_callback(self, callback, *args, **kwargs)

    algorithm_cls._init_callback = _init_callback


def _patch_lightning(module: ModuleType) -> None:
    trainer_cls = module.Trainer
    original_init = trainer_cls.__init__

    # wraps: LightningCLI reads the Trainer's arguments from this signature.
    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        try:
            _add_lightning_callback(self)
        except Exception:
            log.warning("atm: cannot manage this Lightning Trainer", exc_info=True)

    trainer_cls.__init__ = __init__


def _add_lightning_callback(trainer: Any) -> None:
    current = session.current()
    if current is None:
        return
    from integrations.lightning import ManagerLightningCallback
    from integrations.protocol import Boundary

    if not any(isinstance(c, ManagerLightningCallback) for c in trainer.callbacks):
        config = _config()
        trainer.callbacks.append(
            ManagerLightningCallback(
                objective=config.objective,
                poll_interval=config.poll_interval,
                apply_at=_boundary(Boundary.STEP, (Boundary.STEP, Boundary.EVAL)),
                bounds=config.bounds,
            )
        )
    current.claim(ManagerLightningCallback.framework)


def _patch_accelerate(module: ModuleType) -> None:
    # An Accelerator's loop is managed through its optimizer (below); what it can lack is a
    # run, when none of its trackers is one the manager reads.
    accelerator_cls = module.Accelerator
    original_init_trackers = accelerator_cls.init_trackers

    @functools.wraps(original_init_trackers)
    def init_trackers(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_init_trackers(self, *args, **kwargs)
        try:
            _say_if_accelerator_unbound(self)
        except Exception:
            log.warning("atm: cannot look for this Accelerator's run", exc_info=True)
        return result

    accelerator_cls.init_trackers = init_trackers


def _say_if_accelerator_unbound(accelerator: Any) -> None:
    from integrations.health import no_tracker_logger
    from integrations.trackers import bind_run

    if not accelerator.is_main_process or bind_run() is not None:
        return
    trackers = [str(tracker.name) for tracker in accelerator.trackers]
    fix = 'use Accelerator(log_with="mlflow") or log_with="wandb", or start an MLflow run'
    log.warning("atm: %s", no_tracker_logger("this Accelerator", "tracker", trackers, fix))


def _contains(callback: Any, kind: type) -> bool:
    """Whether ``callback`` (a callback, a list, or nested CallbackLists) holds a ``kind``."""
    if isinstance(callback, kind):
        return True
    children = callback if isinstance(callback, list) else getattr(callback, "callbacks", None)
    return isinstance(children, list) and any(_contains(c, kind) for c in children)


def _patch_torch_schedulers(module: ModuleType) -> None:
    scheduler_cls = module.LRScheduler
    original_init = scheduler_cls.__init__

    def __init__(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, optimizer, *args, **kwargs)
        if (current := session.current()) is not None:
            current.schedulers.setdefault(optimizer, []).append(self)

    scheduler_cls.__init__ = __init__


def _patch_torch_optimizer(module: ModuleType) -> None:
    module.register_optimizer_step_pre_hook(_before_optimizer_step)


def _before_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    current = session.current()
    if current is None or current.owner not in (None, _LOOP):
        return
    try:
        if current.loop is None:
            from integrations.ranks import distributed_rank

            if distributed_rank() is None and os.environ.get("RANK", "0") != "0":
                # Ranks training apart, with no process group to follow rank 0 through.
                current.claim("another rank")
                return
            current.loop = _LoopKnobs(optimizer, current)
            current.claim(_LOOP)
        current.loop.before_step(optimizer)
    except Exception:
        # Whatever goes wrong here, the training step must still happen.
        log.warning("atm: the optimizer hook failed; training continues unmanaged", exc_info=True)
        current.claim("failed")


# The owner name of a loop managed through its optimizer, distinct from a script's own TorchKnobs.
_LOOP = "optimizer hook"

# Optimizer steps without a tracker run before the loop is said to be unmanaged: a script may
# start its run with its first logged metric, and log every 100 steps from step 100.
UNBOUND_AFTER_STEPS = 200
# Steps between two looks for the run: a look is cheap (no request), but not free.
LOOK_EVERY_STEPS = 10
_LOOP_FIX = (
    "log to a run (mlflow.start_run(), mlflow.log_metric(...) or wandb.init()), or continue "
    "one with atm run --run-id RUN_ID"
)


class _LoopKnobs:
    """A hand-written loop's first optimizer, managed from a global step pre-hook.

    A version applies before the optimizer step that first uses it, and is recorded at that
    step's number counted from 0 (the optimizer steps taken before it): the step of the usual
    ``for step in range(n)`` loop whose lr, logged after ``opt.step()``, first shows it.

    Under several ranks every rank builds one at its first step and joins rank 0's exchanges
    there; rank 0 connects to the run when it finds one, the others follow it.
    """

    def __init__(self, optimizer: Any, current: session.Session) -> None:
        from integrations.protocol import Boundary
        from integrations.torch_hooks import TorchKnobs

        self.optimizer = optimizer
        self.session = current
        self.steps = 0  # optimizer steps taken
        schedulers = current.schedulers.get(optimizer) or [None]
        # No commands: an unmodified loop has no way to be told to stop or checkpoint.
        self.knobs = TorchKnobs(
            optimizer=optimizer,
            scheduler=schedulers[-1],
            bounds=current.config.bounds,
            apply_at=Boundary.STEP,
            commands=[],
        )
        self.knobs.join_ranks()
        self.connected = False
        self.said_unbound = False
        self._next_look = 0

    def before_step(self, optimizer: Any) -> None:
        if optimizer is not self.optimizer:
            return
        if not self.connected:
            self._connect()
        self.knobs.step(self.steps)
        self.steps += 1

    def _connect(self) -> None:
        # Look for the run at the first step, then every few steps: a script may start its
        # run (or log its first metric, which starts one) only after some steps.
        if self.steps < self._next_look:
            return
        self._next_look = self.steps + LOOK_EVERY_STEPS
        from integrations.client import ManagerClient
        from integrations.trackers import bind_run

        ranks = self.knobs.ranks
        if (ranks is None or ranks.leads) and bind_run() is None:
            if self.steps >= UNBOUND_AFTER_STEPS and not self.said_unbound:
                self.said_unbound = True
                self.knobs.say_unbound(f"after {self.steps} optimizer steps", fix=_LOOP_FIX)
            return
        config = self.session.config
        self.knobs.start(objective=config.objective, poll_interval=config.poll_interval)
        self.connected = True
        client = self.knobs.client
        if self.said_unbound and isinstance(client, ManagerClient):
            log.warning(
                "atm: found run %s after %d optimizer steps; the loop is managed from now on",
                client.run_id,
                self.steps,
            )
