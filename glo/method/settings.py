"""Every knob of the method in one frozen object, checked once with one-line errors, passed whole."""
from __future__ import annotations

from dataclasses import dataclass

from glo import GloError, is_number
from glo.model.hardware import check_precision

OPTIMS = ("adam", "gradfree", "lbfgs")
SCHEDULES = ("constant", "cosine")
ANCHORS = ("z0", "posterior")
COORDS = ("channels", "whitened")


@dataclass(frozen=True)
class Settings:
    """Every knob of the method, checked once, passed whole. Built by Hydra from `engine:` in conf/run.yaml,
    which holds every default: no knob has a second default here."""

    optim: str                  # adam (back-propagate the pixel loss) | lbfgs (the same, quasi-Newton with a line
                                # search, one sample at a time) | gradfree (follow E(D(z)) - E(x))
    lr: float
    betas: tuple[float, float]  # Adam's
    eps: float                  # Adam's, times the RMS of the sample's first gradient (so neither the loss's scale
                                # nor the image size changes it): larger moves the elements the loss barely responds
                                # to by less than lr per step
    anchor: float               # weight of mean(((z - z0) / scale)^2) added to each sample's loss: a pull toward z0
    anchor_to: str              # z0: scale 1 | posterior: scale = the encoder's posterior std over its mean on the
                                # image (a Mahalanobis pull with the same average strength as z0's)
    anderson: int               # > 0: each update starts from the mix of the last `anderson` iterates whose loss, as
                                # least squares extrapolated linearly, is smallest (Anderson acceleration);
                                # optim=adam only
    channel_lr: tuple[float, ...] | None  # one multiplier of Adam's step per latent channel, or None (all 1);
                                # optim=adam only
    coords: str                 # channels: Adam on each latent element | whitened: on each latent's coordinates along
                                # its principal channel directions, in units of its spread (glo.method.whiten);
                                # optim=adam only
    schedule: str               # constant | cosine (to 0 at max_steps)
    warmup_steps: int
    max_steps: int              # update budget per image
    rel_tol: float              # a sample stops when its loss changed by at most rel_tol (relative) ...
    window: int                 # ... over the last `window` steps
    precision: str              # the decoder's autocast dtype: auto | fp32 | bf16 | fp16

    def __post_init__(self) -> None:
        betas = self.betas
        ok = isinstance(betas, (list, tuple))
        if not (ok and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
            raise GloError(f"betas={list(betas) if ok else betas}: must be two numbers in [0, 1), "
                           "e.g. 'betas=[0.9,0.999]'")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        lrs = self.channel_lr
        if lrs is not None:
            if not (isinstance(lrs, (list, tuple)) and lrs and all(is_number(c) and c >= 0 for c in lrs)):
                raise GloError(f"channel_lr={lrs}: must be null or one number >= 0 per latent channel, "
                               "e.g. 'channel_lr=[8,1,1,1]'")
            object.__setattr__(self, "channel_lr", tuple(float(c) for c in lrs))
        for key, kind in (("lr", float), ("eps", float), ("anchor", float), ("rel_tol", float), ("max_steps", int),
                          ("window", int), ("warmup_steps", int), ("anderson", int)):
            if not is_number(getattr(self, key), kind):
                kind_name = "a finite number" if kind is float else "an integer"
                raise GloError(f"{key}={getattr(self, key)!r}: must be {kind_name}")
        for ok, message in (
            (self.lr > 0, f"lr={self.lr}: must be > 0"),
            (self.max_steps >= 1, f"max_steps={self.max_steps}: must be >= 1"),
            (self.rel_tol >= 0, f"rel_tol={self.rel_tol}: must be >= 0"),
            (self.window >= 1, f"window={self.window}: must be >= 1"),
            (self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps}: must be >= 0"),
            (self.warmup_steps <= self.max_steps,
             f"warmup_steps={self.warmup_steps}: must be <= max_steps={self.max_steps}, or lr is never reached"),
            (self.eps > 0, f"eps={self.eps}: must be > 0"),
            (self.anchor >= 0, f"anchor={self.anchor}: must be >= 0"),
            (self.anderson >= 0, f"anderson={self.anderson}: must be >= 0"),
            (self.anchor == 0 or self.optim != "gradfree", f"anchor={self.anchor}: gradfree has no loss to add it to"),
            (self.channel_lr is None or self.optim == "adam", f"channel_lr: optim={self.optim} takes no Adam steps"),
            (self.anchor_to in ANCHORS, f"anchor_to={self.anchor_to}: must be one of {', '.join(ANCHORS)}"),
            (self.optim in OPTIMS, f"optim={self.optim}: must be one of {', '.join(OPTIMS)}"),
            (self.coords in COORDS, f"coords={self.coords}: must be one of {', '.join(COORDS)}"),
            (self.coords == "channels" or (self.optim == "adam" and self.channel_lr is None),
             f"coords=whitened: takes Adam steps on mixed channels (optim=adam, channel_lr=null), not "
             f"optim={self.optim} channel_lr={self.channel_lr}"),
            (self.schedule in SCHEDULES, f"schedule={self.schedule}: must be one of {', '.join(SCHEDULES)}"),
        ):
            if not ok:
                raise GloError(message)
        check_precision(self.precision)
