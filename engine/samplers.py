"""A1111 sampler names -> diffusers scheduler classes (a plain registry; no imports of diffusers here).

`infotext` is how A1111 >= 1.9 writes the pair (Sampler, Schedule type) for that choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str  # diffusers class name
    config: dict[str, Any] = field(default_factory=dict)
    a1111_sampler: str = ""
    a1111_schedule: str = ""


SAMPLERS: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec("EulerDiscreteScheduler", {}, "Euler"),
    "Euler a": SamplerSpec("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "DPM++ 2M": SamplerSpec(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"
    ),
    "DPM++ 2M Karras": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M",
        "Karras",
    ),
    "DPM++ SDE Karras": SamplerSpec(
        "DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}, "DPM++ SDE", "Karras"
    ),
    "Heun": SamplerSpec("HeunDiscreteScheduler", {}, "Heun"),
    "DDIM": SamplerSpec("DDIMScheduler", {"set_alpha_to_one": False}, "DDIM"),
    "UniPC": SamplerSpec("UniPCMultistepScheduler", {}, "UniPC"),
    "LCM": SamplerSpec("LCMScheduler", {}, "LCM"),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler of the named kind built from the model's own scheduler config."""
    import diffusers

    spec = SAMPLERS[name]
    cls = getattr(diffusers, spec.scheduler)
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    # Settings that belong to another scheduler family must not leak into this one.
    for key in ("use_karras_sigmas", "algorithm_type", "solver_order"):
        config.pop(key, None)
    config.update(spec.config)
    return cls.from_config(config)
