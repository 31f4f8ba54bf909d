"""Defects of transformers releases that break a model class whatever smar does.

Each entry names the class, the releases, the symptom and what the user can do:
:func:`smar.attach` warns with it in one line, and the tests skip with it instead of failing.
Model classes are matched by name: this module does not import transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["UpstreamDefect", "UPSTREAM_DEFECTS", "upstream_defect"]


@dataclass(frozen=True)
class UpstreamDefect:
    """A transformers release that cannot run a model class, and what the user can do."""

    model_class: str
    releases: tuple[str, ...]
    symptom: str
    remedy: str

    def message(self, release: str) -> str:
        return f"transformers {release}: {self.model_class}: {self.symptom}; {self.remedy}"


UPSTREAM_DEFECTS: tuple[UpstreamDefect, ...] = (
    UpstreamDefect(
        "Llama4ForConditionalGeneration",
        ("5.24.0",),
        "forward reads `image_outputs` from its language model's MoeCausalLMOutputWithPast "
        "(AttributeError on every call, return_dict or not)",
        "install transformers 5.23 or >= 5.25 (fixed there)",
    ),
)


def _transformers_release() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def upstream_defect(model: nn.Module) -> str | None:
    """One line naming the known defect of the installed transformers that breaks ``model``'s
    class (the release, the symptom, what to do), or ``None``. :func:`smar.attach` warns with it;
    the tests skip with it."""
    release = _transformers_release()
    name = type(model).__name__
    for defect in UPSTREAM_DEFECTS:
        if defect.model_class == name and release in defect.releases:
            return defect.message(release)
    return None
