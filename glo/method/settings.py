"""Every knob of the method in one frozen object, checked once with one-line errors, passed whole."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from glo import GloError
from glo.model.schema import Built, Count, NonNegative, Positive

Unit = Annotated[float, Field(ge=0, lt=1)]
AsTuple = BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)  # YAML has lists, the object keeps tuples


class Settings(Built):
    """Every knob of the method, checked once, passed whole. Built by Hydra from `engine:` in conf/run.yaml,
    which holds every default: no knob has a second default here."""

    optim: Literal["adam", "gradfree", "lbfgs"]  # adam (back-propagate the pixel loss) | lbfgs (the same,
                                # quasi-Newton with a line search, one sample at a time) | gradfree (follow
                                # E(D(z)) - E(x))
    lr: Positive
    betas: Annotated[tuple[Unit, Unit], AsTuple]  # Adam's
    eps: Positive               # Adam's, times the RMS of the sample's first gradient (so neither the loss's scale
                                # nor the image size changes it): larger moves the elements the loss barely responds
                                # to by less than lr per step
    anchor: Annotated[float, Field(ge=0)]  # weight of mean(((z - z0) / scale)^2) added to each sample's loss
    anchor_to: Literal["z0", "posterior"]  # z0: scale 1 | posterior: scale = the encoder's posterior std, scaled
                                # so 1 / scale^2 averages 1 on each image (a Mahalanobis pull as strong as z0's)
    anderson: NonNegative       # > 0: each update starts from the mix of the last `anderson` iterates whose loss, as
                                # least squares extrapolated linearly, is smallest (Anderson acceleration);
                                # optim=adam only
    channel_lr: Annotated[tuple[Annotated[float, Field(ge=0)], ...], Field(min_length=1), AsTuple] | None
                                # one multiplier of Adam's step per latent channel, or None (all 1); optim=adam only
    coords: Literal["channels", "whitened"]  # channels: Adam on each latent element | whitened: on each latent's
                                # coordinates along its principal channel directions, in units of its spread
                                # (glo.method.whiten); optim=adam only
    schedule: Literal["constant", "cosine"]  # cosine: to 0 at max_steps
    warmup_steps: NonNegative
    max_steps: Count            # update budget per image
    rel_tol: Annotated[float, Field(ge=0)]  # a sample stops when its loss changed by at most rel_tol (relative) ...
    window: Count               # ... over the last `window` steps
    precision: Literal["auto", "fp32", "bf16", "fp16"]  # the decoder's autocast dtype

    def model_post_init(self, context: object) -> None:
        """What no single setting's type says: the combinations that cannot run."""
        for ok, message in (
            (self.warmup_steps <= self.max_steps,
             f"warmup_steps={self.warmup_steps}: must be <= max_steps={self.max_steps}, or lr is never reached"),
            (self.anchor == 0 or self.optim != "gradfree", f"anchor={self.anchor}: gradfree has no loss to add it to"),
            (self.channel_lr is None or self.optim == "adam", f"channel_lr: optim={self.optim} takes no Adam steps"),
            (self.coords == "channels" or (self.optim == "adam" and self.channel_lr is None),
             f"coords=whitened: takes Adam steps on mixed channels (optim=adam, channel_lr=null), not "
             f"optim={self.optim} channel_lr={self.channel_lr}"),
        ):
            if not ok:
                raise GloError(message)
