"""``priorzoo convert``: turn posteriors saved by other code into priorzoo prior folders.

Sources (see :mod:`priorzoo.convert` for the exact layouts and conventions):

* ``official PREFIX`` — a "Pre-Train Your Loss" release: ``PREFIX_model.pt``, ``_mean.pt``, ``_variance.pt``,
  ``_covmat.pt``;
* ``swa-gaussian FILE`` — a swa_gaussian ``SWAG`` state dict / checkpoint;
* ``laplace FILE --model NAME`` — a laplace-torch ``DiagLaplace`` state dict, with the model it was
  fitted on (its parameter names and shapes).

Every file is read with ``torch.load(weights_only=True)``; nothing is unpickled.

Example:
    $ priorzoo convert official priors/resnet50_ssl_prior ./resnet50-ssl-prior --num-factors 5
    $ priorzoo convert swa-gaussian swag-300.pt ./preresnet-swag --exclude "fc.*"
    $ priorzoo convert laplace la_state.bin ./r18-laplace --model resnet18 --num-classes 10 --no-pretrained
"""

from __future__ import annotations

import argparse
from typing import Any

from priorzoo.cli._common import add_overwrite_argument, fail, saving_into

__all__ = ["register"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand (with ``official``, ``swa-gaussian``, ``laplace``) to the parser."""
    p = subparsers.add_parser(
        "convert",
        help="import an official / swa_gaussian / laplace-torch posterior as a prior",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    sub = p.add_subparsers(dest="source_format", metavar="SOURCE", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "output", nargs="?", default=None, metavar="OUTPUT", help="folder to write the prior into (or --output-dir)"
        )
        q.add_argument("--output-dir", default=None, help="folder to write the prior into")
        add_overwrite_argument(q, "OUTPUT")
        q.add_argument("--scale", type=float, default=1.0, help="λ stored in the prior")
        q.add_argument("--eps", type=float, default=0.0, help="ε stored in the prior")
        q.add_argument("--license", default=None, help="license of the prior, for its model card")
        q.add_argument("--dataset", default=None, help="source dataset, for the card")
        q.add_argument("--objective", default=None, help="source objective, for the card")

    o = sub.add_parser(
        "official",
        help='"Pre-Train Your Loss" four-file release',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    o.add_argument("prefix", help="path prefix before _model.pt/_mean.pt/_variance.pt/_covmat.pt")
    common(o)
    o.add_argument(
        "--num-factors", type=int, default=5, help="covmat rows kept (official number_of_samples_prior); -1 keeps all"
    )
    o.add_argument(
        "--convention",
        choices=("official", "swag"),
        default="official",
        help="official: tensors as stored (λ=1 is the official density); swag: ½ as priorzoo learns",
    )

    s = sub.add_parser(
        "swa-gaussian", help="swa_gaussian SWAG state dict", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    s.add_argument("path", help="the swa_gaussian SWAG checkpoint (.pt, read with weights_only=True)")
    common(s)
    s.add_argument("--prefix", default="base.", help="prefix of the wrapped model in the keys")
    s.add_argument("--exclude", action="append", default=None, help="glob of parameters to leave out (repeatable)")
    s.add_argument("--swag-scale", type=float, default=0.5, help="swa_gaussian's sampling scale (its default 0.5)")
    s.add_argument("--max-num-models", type=int, default=None, help="deviations kept (default: all in the checkpoint)")

    la = sub.add_parser(
        "laplace", help="laplace-torch DiagLaplace state dict", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    la.add_argument("path", help="the laplace-torch posterior state (.pt, read with weights_only=True)")
    common(la)
    la.add_argument("--model", required=True, help="timm name or transformers name/folder of the fitted model")
    la.add_argument("--library", choices=("auto", "timm", "transformers"), default="auto", help="library of --model")
    la.add_argument("--num-classes", type=int, default=1000, help="outputs of the fitted model's head")
    la.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="only the architecture is needed, so no weights are downloaded by default",
    )
    la.add_argument("--include", action="append", default=None, help="glob of parameters to keep (repeatable)")
    la.add_argument("--exclude", action="append", default=None, help="glob of parameters to leave out (repeatable)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``priorzoo convert``; returns the exit code."""
    from priorzoo.errors import PriorFormatError
    from priorzoo.format.serialization import check_target

    if (args.output is None) == (args.output_dir is None):
        return fail("convert", ValueError("give the output folder once: as OUTPUT or as `--output-dir`"))
    output = args.output if args.output is not None else args.output_dir
    option = "OUTPUT" if args.output is not None else "--output-dir"
    try:
        with saving_into(option):
            # before converting: never after minutes of work
            check_target(output, option, overwrite=args.overwrite)
            prior = _convert(args)
            folder = prior.save_pretrained(output, overwrite=args.overwrite)
    except (ValueError, ImportError, OSError, PriorFormatError) as err:
        return fail("convert", err)
    print(f"wrote {prior!r} to {folder}")
    return 0


def _convert(args: argparse.Namespace) -> Any:
    from priorzoo import convert

    source = {k: v for k, v in (("dataset", args.dataset), ("objective", args.objective)) if v}
    if args.source_format == "official":
        return convert.from_pretrain_your_loss(
            args.prefix,
            num_factors=None if args.num_factors == -1 else args.num_factors,
            convention=args.convention,
            scale=args.scale,
            eps=args.eps,
            source=source,
            license=args.license,
        )
    if args.source_format == "swa-gaussian":
        return convert.from_swa_gaussian(
            args.path,
            prefix=args.prefix,
            exclude=args.exclude,
            swag_scale=args.swag_scale,
            max_num_models=args.max_num_models,
            scale=args.scale,
            eps=args.eps,
            source=source,
            license=args.license,
        )
    from priorzoo.backbones import load_backbone

    # the model only supplies parameter names and shapes; a transformers model gets a sequence-classification head
    model = load_backbone(
        args.model,
        library=args.library,
        pretrained=args.pretrained,
        num_classes=args.num_classes,
        modality="text",
        load_tokenizer=False,
    ).model
    return convert.from_laplace_torch(
        args.path,
        model,
        include=args.include,
        exclude=args.exclude,
        scale=args.scale,
        eps=args.eps,
        source=source,
        license=args.license,
    )
