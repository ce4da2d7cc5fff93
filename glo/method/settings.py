"""Every knob of the method in one frozen object, checked once with one-line errors, passed
whole."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from glo import GloError
from glo.model.schema import Built, Count, NonNegative, Positive

Unit = Annotated[float, Field(ge=0, lt=1)]
# YAML has lists, the object keeps tuples
AsTuple = BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)


class Settings(Built):
    """Every knob of the method, checked once, passed whole. Each one's default and meaning live in
    conf/run.yaml (glo.app.config.built makes this from its top-level keys); here, only its type and
    range."""

    optim: Literal["adam", "gradfree", "lbfgs"]
    lr: Positive
    betas: Annotated[tuple[Unit, Unit], AsTuple]
    eps: Positive
    anchor: Annotated[float, Field(ge=0)]
    anchor_to: Literal["z0", "posterior"]
    anderson: NonNegative
    channel_lr: (
        Annotated[tuple[Annotated[float, Field(ge=0)], ...], Field(min_length=1), AsTuple] | None
    )
    coords: Literal["channels", "whitened"]
    schedule: Literal["constant", "cosine"]
    warmup_steps: NonNegative
    max_steps: Count
    rel_tol: Annotated[float, Field(ge=0)]
    window: Count
    precision: Literal["auto", "fp32", "bf16", "fp16"]

    def model_post_init(self, context: object) -> None:
        """What no single setting's type says: the combinations that cannot run."""
        for ok, message in (
            (
                self.warmup_steps <= self.max_steps,
                f"warmup_steps={self.warmup_steps}: must be <= max_steps={self.max_steps}, or lr "
                "is never reached",
            ),
            (
                self.anchor == 0 or self.optim != "gradfree",
                f"anchor={self.anchor}: gradfree has no loss to add it to",
            ),
            (
                self.channel_lr is None or self.optim == "adam",
                f"channel_lr: optim={self.optim} takes no Adam steps",
            ),
            (
                self.coords == "channels" or (self.optim == "adam" and self.channel_lr is None),
                "coords=whitened: takes Adam steps on mixed channels (optim=adam, "
                f"channel_lr=null), not optim={self.optim} channel_lr={self.channel_lr}",
            ),
        ):
            if not ok:
                raise GloError(message)
