"""Settings of the training side, read from the environment once per client.

``ATM_*`` for ours, and the trackers' own variables where they exist: a process that already
logs to MLflow needs nothing more. The daemon's settings (``manager_daemon.settings``) build
on ``TrackerSettings``, so both sides read the tracker and the signing key the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from integrations.trackers.base import RunBinding

# A thousand clients polling one tracker every 5 s make 200 quiet reads a second.
DEFAULT_POLL_INTERVAL_S = 5.0
# An evaluation usually comes within minutes of a run's first training metrics.
DEFAULT_OBJECTIVE_GRACE_S = 300.0


class TrackerSettings(BaseSettings):
    """Where the tracker is, and the key that signs params versions."""

    model_config = SettingsConfigDict(
        env_prefix="ATM_", populate_by_name=True, extra="ignore", validate_default=True
    )

    tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("ATM_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="The tracker: an MLflow URI (http(s)://…, sqlite:///…, databricks) or "
        "wandb://ENTITY/PROJECT",
    )
    signing_key: SecretStr | None = Field(
        None,
        description="Shared key that signs params versions (HMAC-SHA256); the daemon and every "
        "client must hold the same one. Without it versions carry an integrity digest only",
    )

    def key(self) -> str | None:
        """The signing key in clear, for signing and verifying only."""
        return self.signing_key.get_secret_value() if self.signing_key else None


class ClientSettings(TrackerSettings):
    """What a training process's client reads from its environment."""

    poll_interval: float = Field(
        DEFAULT_POLL_INTERVAL_S,
        gt=0,
        description="Seconds between the client's polls of the params version (default: "
        "5, or what the tracker asks for: 30 against W&B's hosted service)",
    )
    objective_grace: float = Field(
        DEFAULT_OBJECTIVE_GRACE_S,
        ge=0,
        description="Seconds a run may log other metrics without its objective before the "
        "client says the objective is never logged (at once when an evaluation reported to "
        "the integration lacks it, and at the end of training)",
    )
    rank_sync_every: int = Field(
        10,
        ge=1,
        description="Under several ranks (torchrun, DDP): rank 0 hands its staged version to "
        "the other ranks at every step that is a multiple of this; all apply it there",
    )
    rank_timeout: float = Field(
        300.0,
        gt=0,
        description="Under several ranks: the longest a rank waits for the others at an "
        "exchange before it stops applying versions (training carries on)",
    )

    def poll_interval_for(self, binding: RunBinding) -> float:
        """The poll interval set for this process, else the tracker's own, else the default."""
        if "poll_interval" in self.model_fields_set or binding.poll_interval is None:
            return self.poll_interval
        return binding.poll_interval


def env_names(settings: type[BaseSettings], name: str) -> list[str]:
    """The environment variables a settings field is read from, in order of precedence."""
    field = settings.model_fields[name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"{settings.model_config.get('env_prefix', '')}{name}".upper()]
