"""The prior's on-disk format: what a prior folder holds and how it is written and read.

Owns the config schema (:mod:`~priorzoo.format.config`), the folder's file layout and format constants
(:mod:`~priorzoo.format.files`), save and load of the safetensors files (:mod:`~priorzoo.format.serialization`),
the commit of a save into a folder (:mod:`~priorzoo.format.commit`: lock, temporary names, ``config.json`` last),
safetensors files read and written through one open file (:mod:`~priorzoo.format.tensorfile`),
the checks a loaded prior's tensors pass (:mod:`~priorzoo.format.checks`), the model card
(:mod:`~priorzoo.format.cards`) and how published provenance names local files
(:mod:`~priorzoo.format.local_paths`: by name and sha256, never by path).

May import: the bottom modules (``priorzoo.errors``, ``enums``, ``_version``, ``validation``, ``gaussian``,
``numerics``) and its own modules; never the Hub code, the binding, learning, fine-tuning or applications.
"""

__all__: list[str] = []
