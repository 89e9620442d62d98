"""Policies propose updates from a telemetry snapshot and a menu; validation decides."""

from manager_daemon.policies.base import Policy, PolicyAnswer
from manager_daemon.policies.rules import RulesConfig, RulesPolicy

__all__ = ["Policy", "PolicyAnswer", "RulesConfig", "RulesPolicy"]
