"""How a caption becomes the text a model sees: the one cleaning rule for training captions and node prompts.

It is the Wan pipelines' own prompt cleaning (diffusers `prompt_clean`): mojibake repaired by ftfy where it is
installed (as the pipelines do; neither ComfyUI nor this project requires it), HTML entities decoded twice
(`&amp;quot;` -> `"`), every run of whitespace (newlines, tabs, double spaces) one space, the ends trimmed. A
model trained on cleaned captions and prompted through the same rule sees one kind of text.
"""
from __future__ import annotations

import html
import re

try:
    import ftfy
except ImportError:  # optional, as in diffusers
    ftfy = None

WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return WHITESPACE.sub(" ", text).strip()
