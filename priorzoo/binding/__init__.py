"""Binding a prior to a model: which prior blocks map onto which parameters, and the bound prior each kind gives.

Owns parameter matching and selection (:mod:`~priorzoo.binding.matching`, :mod:`~priorzoo.binding.selection`),
the PEFT view (:mod:`~priorzoo.binding.peft`), the bound prior (:mod:`~priorzoo.binding.bound`) and its kinds:
conditional on frozen weights (:mod:`~priorzoo.binding.conditional`) and sharded under FSDP2
(:mod:`~priorzoo.binding.sharded`), and batch-norm statistics (:mod:`~priorzoo.binding.batchnorm`).
:class:`priorzoo.PriorModel` (``priorzoo/prior.py``) is the facade on top of it.

May import: the bottom modules, :mod:`priorzoo.format` and :mod:`priorzoo.hub`; never learning, fine-tuning or
applications.
"""

__all__: list[str] = []
