"""The two files of a two-expert model (Wan 2.2 A14B) as a pair: which file is which expert, and their boundary.

A FastLightGen student names its expert and the boundary in its metadata (`CheckpointMeta.expert/boundary`); the
A14B teacher files ComfyUI distributes carry no metadata, only names (wan2.2_t2v_high_noise_14B_fp8_scaled...),
so their expert is read from the name and the boundary is the one a node asks for (`experts.requested_boundary`:
by default the one of the model's kind, I2V's for image-conditioned experts, else T2V's). `pair_boundary` checks
a pair before anything samples it: two files of one expert, a pair wired the wrong way round, or two boundaries
that differ are errors naming the fix; it returns the sigma where the low-noise expert takes over.
`pair_sampling` gives the pair's recommended schedule (two that differ: an error).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointMeta
from .experts import EXPERTS, check_boundary
from .sampling import FEW_STEP, Sampling

# ComfyUI's and Wan-AI's names for the A14B experts' files: ..._high_noise_14B_..., ..._low_noise_14B_...
_NAMED_EXPERT = re.compile(r"(high|low)[_-]noise", re.IGNORECASE)
INPUT_NAMES = {"high": "the high-noise input", "low": "the low-noise input"}


@dataclass(frozen=True)
class ExpertTag:
    """What is known of one expert's file: its expert, the boundary its metadata names (None for a file without
    FastLightGen metadata), and where it came from, for messages."""
    expert: str
    boundary: float | None
    source: str

    def __post_init__(self):
        if self.expert not in EXPERTS:
            raise ValueError(f"unknown expert {self.expert!r}; the experts are {', '.join(EXPERTS)}")


def named_expert(name: str) -> str | None:
    """'high' or 'low' when a file's name says which expert it holds ('high_noise' / 'low_noise'), else None."""
    found = {m.group(1).lower() for m in _NAMED_EXPERT.finditer(Path(name).name)}
    return found.pop() if len(found) == 1 else None


def meta_tag(meta: CheckpointMeta | None, source: str) -> ExpertTag | None:
    """The tag of a file from its FastLightGen metadata, else from its name; None when neither says."""
    if meta is not None and meta.expert is not None:
        return ExpertTag(meta.expert, meta.boundary, source)
    expert = named_expert(source)
    return ExpertTag(expert, None, source) if expert else None


def pair_sampling(high: CheckpointMeta | None, low: CheckpointMeta | None, sources: tuple[str, str]) -> Sampling:
    """The pair's recommended sampling (the default few steps when neither file names one): two experts exported
    together recommend the same."""
    named = [(meta.recommended, source) for meta, source in zip((high, low), sources) if meta is not None]
    if len(named) == 2 and named[0][0] != named[1][0]:
        raise ValueError(f"{named[0][1]} recommends {named[0][0]} but {named[1][1]} {named[1][0]}: the experts come "
                         "from different exports; use the pair exported together")
    return named[0][0] if named else FEW_STEP


def pair_boundary(high: ExpertTag | None, low: ExpertTag | None, fallback: float) -> float:
    """The boundary of the pair (`high` given as the high-noise expert, `low` as the low-noise one): the one their
    metadata names, else `fallback`. A pair of one expert, a swapped pair or two boundaries are errors."""
    if high is not None and low is not None and high.expert == low.expert:
        other = "low" if high.expert == "high" else "high"
        raise ValueError(f"both {high.source} and {low.source} are the {high.expert}-noise expert; connect the "
                         f"{other}-noise expert's file to {INPUT_NAMES[other]}")
    if (high is not None and high.expert == "low") or (low is not None and low.expert == "high"):
        names = " and ".join(t.source for t in (high, low) if t is not None)
        raise ValueError(f"the experts are swapped: {names} went to the other expert's input; connect the "
                         "high-noise expert to the high-noise input (model / high_noise) and the low-noise expert "
                         "to the low-noise one")
    named = {t.boundary for t in (high, low) if t is not None and t.boundary is not None}
    if len(named) > 1:
        raise ValueError(f"{high.source} names the boundary {high.boundary} but {low.source} names {low.boundary}: "
                         "the two experts come from different models or exports; use the pair exported together")
    return check_boundary(named.pop() if named else fallback)


def pair_channels(high: tuple[int, int], low: tuple[int, int], sources: tuple[str, str]) -> tuple[int, int]:
    """The (input, output) channels both experts take; experts of two models (T2V-A14B's with I2V-A14B's) are an
    error."""
    if high != low:
        raise ValueError(f"{sources[0]} takes {high[0]} input channels but {sources[1]} takes {low[0]}: they are "
                         "experts of two different models (I2V-A14B's take 36, T2V-A14B's 16); load both experts of "
                         "one model")
    return high
