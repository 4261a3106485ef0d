"""``python -m priorzoo.cli``: the ``priorzoo`` command, e.g. under ``torchrun --nproc_per_node 2 -m priorzoo.cli``."""

from priorzoo.cli import main

raise SystemExit(main())
