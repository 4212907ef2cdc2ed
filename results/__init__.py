"""Results: the paper's numbers (results/paper/), tables of our runs against them (``python -m results.collect``),
and the gradient-variance figures (``python -m results.figures``). Depends on PyYAML and matplotlib only."""
