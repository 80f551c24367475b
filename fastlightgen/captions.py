"""How a caption becomes the text a model sees: the one cleaning rule for training captions and node prompts.

It is the Wan pipelines' prompt cleaning (diffusers `prompt_clean`) without its ftfy step: HTML entities decoded
twice (`&amp;quot;` -> `"`), every run of whitespace (newlines, tabs, double spaces) one space, the ends trimmed.
ftfy's mojibake repair is left out because neither ComfyUI nor this project installs ftfy, and a rule that
changed with what happens to be installed would give training and inference different text.
"""
from __future__ import annotations

import html
import re

WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    return WHITESPACE.sub(" ", html.unescape(html.unescape(text))).strip()
