"""research.recipe_choice chooses on training prompts at noise seeds the report does not evaluate."""
from __future__ import annotations

import pytest

from fastlightgen.toy.prompts import split_prompts
from research import recipe_choice
from research.demo import MODES
from research.reproduce import FULL, training_prompts


def test_training_prompts_never_touch_held_out_combinations():
    prompts = training_prompts(12)
    held_out = {f.combination for f in split_prompts("heldout").factors}
    assert [p.mode for p in prompts] == list(MODES)
    for p in prompts:
        assert len(p.factors) == 12
        assert not {f.combination for f in p.factors} & held_out


@pytest.mark.parametrize("seeds", [f"{FULL.seeds[0]},1000", "1000"])
def test_refuses_the_report_s_seeds_and_a_single_seed(seeds, capsys):
    with pytest.raises(SystemExit):
        recipe_choice.main(["--candidate", "stage2.lr=5e-4", "--seeds", seeds])
    assert "--seeds" in capsys.readouterr().err
