#!/usr/bin/env python
"""Build the priorzoo zoo: for each manifest entry, learn the prior, evaluate it, render its card, push it.

Every entry of ``upload_scripts/manifest.toml`` goes through four stages, each skipped when its result is
already there:

1. **learn** — prepare the source data when needed, then run ``priorzoo learn`` (the CLI users have) with the
   entry's backbone, data and SWAG settings into ``OUTPUT_DIR/NAME/learned``. Resumable: the run
   checkpoints every epoch (an interrupted build continues where it stopped), and a finished prior is reused
   as long as the settings that produced it (their fingerprint, in ``build.json``) are unchanged.
2. **evaluate** — when the entry has an ``[evaluate]`` recipe: transfer results and the recommended λ,
   reused while the learned prior's bytes and the recipe are unchanged (``evaluation.json``).
3. **card** — write the publishable folder ``OUTPUT_DIR/NAME/prior`` (license, recommended λ, results,
   provenance in ``config.json``; storage dtype and sharding from ``[storage]``) with its model card.
4. **push** — upload it to ``repo_id`` as one commit with :func:`priorzoo.hub.upload_prior`, which makes no
   commit when the Hub already holds identical files. Builds are deterministic (fixed seeds, a fixed number
   of CPU threads, canonical safetensors headers, sorted JSON), so re-running — even rebuilding from scratch
   — makes no new commit when nothing changed.

Entries that need what this machine lacks (``requires = ["cuda", "hub"]``: a GPU, Hub access) are refused
with the reason before anything runs. ``--dry-run`` prints the plan and touches nothing, locally or remotely.

Usage:
    python upload_scripts/build_zoo.py --list
    python upload_scripts/build_zoo.py --only test-resnet-digits-swag --dry-run
    python upload_scripts/build_zoo.py --only test-resnet-digits-swag --output-dir build/zoo
    HF_TOKEN=hf_... python upload_scripts/build_zoo.py --endpoint https://huggingface.co

Exit status: 0 when every selected entry was built (and pushed, or already up to date); 1 when one was
refused or failed (refusals do not count with ``--skip-unavailable``); 2 for a bad manifest or arguments.

Example:
    >>> entries = load_manifest(DEFAULT_MANIFEST)  # doctest: +SKIP
    >>> [e.name for e in entries if not e.requires]  # doctest: +SKIP
    ['test-resnet-digits-swag']
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        raise SystemExit("build_zoo.py reads a TOML manifest: use Python ≥ 3.11, or `pip install tomli`") from None

__all__ = [
    "DEFAULT_MANIFEST",
    "Entry",
    "EntryReport",
    "fingerprint",
    "learn_argv",
    "load_manifest",
    "main",
    "probe_hub",
    "unmet_requirements",
]

HERE = Path(__file__).resolve().parent
DEFAULT_MANIFEST = HERE / "manifest.toml"
"""The zoo's manifest, next to this script."""

RECIPE_VERSION = 1
"""Bump when the build itself changes what a prior's bytes are: every entry is then relearned."""

_REQUIREMENTS = ("cuda", "hub")
_ENTRY_KEYS = {
    "name", "repo_id", "description", "license", "private", "requires", "revision", "subfolder",
    "recommended_scale", "backbone", "data", "learn", "storage", "evaluate", "results",
}  # fmt: skip
_SECTION_KEYS = {
    "backbone": {"library", "name", "pretrained", "hub_id"},
    "data": {
        "source", "id", "config", "split", "name", "image_size", "max_length", "text_column", "label_column",
        "image_column", "max_examples",
    },
    "learn": {
        "objective", "epochs", "warmup_epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule",
        "collect_every", "cycle_steps", "rank", "min_var", "include", "exclude", "seed", "num_workers", "threads",
    },
    "storage": {"factor_dtype", "max_shard_size"},
}  # fmt: skip


class ManifestError(ValueError):
    """The manifest is malformed; the message names the entry, the key, what was received and what is valid."""


# ============================================================================================== manifest
@dataclass(frozen=True)
class Entry:
    """One zoo entry of the manifest (see the comments at the top of ``manifest.toml``)."""

    name: str
    repo_id: str
    description: str = ""
    license: str | None = None
    private: bool = False
    requires: tuple[str, ...] = ()
    revision: str | None = None
    subfolder: str | None = None
    recommended_scale: float | None = None
    backbone: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    learn: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


def _recipes() -> ModuleType:
    """``zoo_recipes`` (next to this file), importable however this script was started."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("zoo_recipes")


def _check_keys(where: str, table: Mapping[str, Any], valid: set[str]) -> None:
    unknown = sorted(set(table) - valid)
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; valid: {sorted(valid)}")


def load_manifest(path: str | os.PathLike[str] = DEFAULT_MANIFEST) -> list[Entry]:
    """Read and validate a zoo manifest (TOML); returns its entries in file order.

    Raises:
        ManifestError: unknown keys (typos), missing required keys, invalid repo ids, duplicate names,
            unknown requirements, data sources or evaluation recipes.

    Example:
        >>> [e.name for e in load_manifest()][:2]  # doctest: +SKIP
        ['test-resnet-digits-swag', 'resnet50-imagenet1k-swag']
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    recipes = _recipes()
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ManifestError(f"cannot read the manifest {str(path)!r}: {err}") from None
    if doc.get("schema") != 1:
        raise ManifestError(f"{path}: `schema` must be 1; received {doc.get('schema')!r}")
    defaults = doc.get("defaults", {})
    _check_keys(f"{path} [defaults]", defaults, {"license", "private", "requires"})
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise ManifestError(f"{path}: no [[entries]]")
    entries: list[Entry] = []
    for i, raw in enumerate(raw_entries):
        where = f"{path} entry #{i + 1} ({raw.get('name', '?')})"
        _check_keys(where, raw, _ENTRY_KEYS)
        for key in ("name", "repo_id", "backbone", "data", "learn"):
            if key not in raw:
                raise ManifestError(f"{where}: missing required key `{key}`")
        for section, valid in _SECTION_KEYS.items():
            _check_keys(f"{where} [{section}]", raw.get(section, {}), valid)
        try:
            validate_repo_id(raw["repo_id"])
        except HFValidationError as err:
            raise ManifestError(f"{where}: `repo_id` {raw['repo_id']!r} is not a valid Hub repo id ({err})") from None
        requires = tuple(raw.get("requires", defaults.get("requires", [])))
        bad = [r for r in requires if r not in _REQUIREMENTS]
        if bad:
            raise ManifestError(f"{where}: `requires` has {bad}; valid: {list(_REQUIREMENTS)}")
        bb, data, learn = raw["backbone"], raw["data"], raw["learn"]
        if bb.get("library") not in ("timm", "transformers") or not bb.get("name"):
            raise ManifestError(f"{where}: [backbone] needs `library` ('timm' or 'transformers') and `name`")
        source = data.get("source")
        if source not in (*recipes.BUILTIN_SOURCES, "hub"):
            raise ManifestError(f"{where}: `data.source` {source!r}; valid: {[*recipes.BUILTIN_SOURCES, 'hub']}")
        if source == "hub" and not data.get("id"):
            raise ManifestError(f"{where}: `data.source = 'hub'` needs the dataset `id`")
        for key in ("objective", "rank"):
            if key not in learn:
                raise ManifestError(f"{where}: [learn] needs `{key}`")
        evaluate = raw.get("evaluate")
        if evaluate is not None and evaluate.get("recipe") not in recipes.EVALUATORS:
            raise ManifestError(
                f"{where}: `evaluate.recipe` {evaluate.get('recipe')!r}; valid: {list(recipes.EVALUATORS)}"
            )
        entries.append(
            Entry(
                name=str(raw["name"]),
                repo_id=str(raw["repo_id"]),
                description=" ".join(str(raw.get("description", "")).split()),
                license=raw.get("license", defaults.get("license")),
                private=bool(raw.get("private", defaults.get("private", False))),
                requires=requires,
                revision=raw.get("revision"),
                subfolder=raw.get("subfolder"),
                recommended_scale=raw.get("recommended_scale"),
                backbone=dict(bb),
                data=dict(data),
                learn=dict(learn),
                storage=dict(raw.get("storage", {})),
                evaluate=dict(evaluate) if evaluate is not None else None,
                results=[dict(r) for r in raw.get("results", [])],
            )
        )
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ManifestError(f"{path}: entry names must be unique; repeated: {dup}")
    return entries


# ============================================================================================== planning
def unmet_requirements(entry: Entry) -> list[str]:
    """Why this machine cannot build ``entry`` (empty when it can), one sentence per unmet requirement.

    Example:
        >>> unmet_requirements(Entry(name="x", repo_id="a/b"))
        []
    """
    reasons = []
    if "cuda" in entry.requires:
        import torch

        if not torch.cuda.is_available():
            reasons.append("a CUDA GPU (torch.cuda.is_available() is False on this machine)")
    if "hub" in entry.requires:
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        from huggingface_hub import constants

        if offline or constants.HF_HUB_OFFLINE:
            what = [entry.backbone.get("hub_id") or entry.backbone.get("name")]
            what += [entry.data["id"]] if entry.data.get("source") == "hub" else []
            reasons.append(f"Hub access for {' and '.join(f'`{w}`' for w in what)} (HF_HUB_OFFLINE is set)")
    return reasons


def probe_hub(entry: Entry, token: str | None = None) -> list[str]:
    """Ask the Hub whether the entry's pre-trained weights and source dataset can be read (``hub`` entries).

    Returns the problems found (empty: all reachable), e.g. a gated dataset whose terms were not accepted,
    a repo that does not exist at this endpoint, or an unreachable Hub. Reads metadata only.

    Example:
        >>> probe_hub(Entry(name="x", repo_id="a/b"))  # no "hub" requirement: nothing to ask
        []
    """
    if "hub" not in entry.requires:
        return []
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    api = HfApi(token=token)
    checks: list[tuple[str, str, Callable[..., Any]]] = []
    model = entry.backbone.get("hub_id") or (
        entry.backbone["name"] if entry.backbone["library"] == "transformers" else None
    )
    if model:
        checks.append(("model", str(model), api.model_info))
    if entry.data.get("source") == "hub":
        checks.append(("dataset", str(entry.data["id"]), api.dataset_info))
    problems = []
    for kind, repo, info in checks:
        try:
            info(repo)
        except GatedRepoError:
            problems.append(f"access to the gated {kind} `{repo}` (accept its terms on the Hub and pass a token)")
        except RepositoryNotFoundError:
            problems.append(f"the {kind} `{repo}`, which {constants.ENDPOINT} does not serve (or it is private)")
        except (HfHubHTTPError, OSError) as err:
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
            problems.append(f"Hub access for the {kind} `{repo}` ({constants.ENDPOINT} could not answer: {detail})")
    return problems


def fingerprint(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj``: what decides whether a stage's earlier result is reused.

    Example:
        >>> fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})
        True
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _needs_preparation(entry: Entry) -> bool:
    return entry.data.get("source") != "hub" or bool(entry.data.get("config"))


def learn_argv(entry: Entry, *, data: str, output: str, checkpoint: str | None, progress: bool = False) -> list[str]:
    """The ``priorzoo learn`` arguments that learn ``entry`` (``data``: the local folder or Hub id to read).

    Only what changes the learned tensors goes here (license, results and card text are added afterwards),
    so editing an entry's metadata never forces a relearn.

    Example:
        >>> e = Entry(name="x", repo_id="a/b", backbone={"library": "timm", "name": "resnet18"},
        ...           data={"source": "hub", "id": "org/images"}, learn={"objective": "simclr", "rank": 5})
        >>> " ".join(learn_argv(e, data="org/images", output="out", checkpoint=None)[:7])
        'learn resnet18 --library timm --pretrained --data org/images'
    """
    bb, d, lr = entry.backbone, entry.data, entry.learn
    hub = not _needs_preparation(entry)
    argv = ["learn", str(bb["name"]), "--library", str(bb["library"])]
    argv += ["--pretrained" if bb.get("pretrained", True) else "--no-pretrained"]
    argv += ["--data", data, "--data-format", "hub" if hub else "disk"]
    argv += ["--split", str(d.get("split", "train"))] if hub else []
    argv += ["--output-dir", output, "--objective", str(lr["objective"]), "--rank", str(lr["rank"])]
    flags = {
        "epochs": "--epochs", "warmup_epochs": "--warmup-epochs", "batch_size": "--batch-size", "lr": "--lr",
        "momentum": "--momentum", "weight_decay": "--weight-decay", "schedule": "--schedule",
        "collect_every": "--collect-every", "cycle_steps": "--cycle-steps", "min_var": "--min-var", "seed": "--seed",
        "num_workers": "--num-workers",
    }  # fmt: skip
    for key, flag in flags.items():
        if key in lr:
            argv += [flag, str(lr[key])]
    for key, flag in (
        ("image_size", "--image-size"),
        ("max_length", "--max-length"),
        ("max_examples", "--max-examples"),
    ):
        if key in d:
            argv += [flag, str(d[key])]
    for key, flag in (
        ("text_column", "--text-column"),
        ("label_column", "--label-column"),
        ("image_column", "--image-column"),
    ):
        if key in d:
            argv += [flag, str(d[key])]
    for key, flag in (("include", "--include"), ("exclude", "--exclude")):
        for pattern in [lr[key]] if isinstance(lr.get(key), str) else lr.get(key, []):
            argv += [flag, str(pattern)]
    if checkpoint is not None:
        argv += ["--checkpoint-dir", checkpoint]
    argv += ["--progress" if progress else "--no-progress"]
    return argv


# ============================================================================================== building
@dataclass
class EntryReport:
    """What happened to one entry: ``status`` is ``built`` (pushed a commit), ``unchanged`` (the Hub already
    held these files), ``local`` (built, not pushed), ``planned`` (dry run), ``refused`` or ``failed``."""

    name: str
    status: str
    detail: str = ""
    commit: str | None = None


@dataclass
class _Paths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def learned(self) -> Path:
        return self.root / "learned"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def final(self) -> Path:
        return self.root / "prior"

    @property
    def state(self) -> Path:
        return self.root / "build.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _file_hash(folder: Path) -> str:
    """SHA-256 over a prior folder's config and tensor files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".json")):
            h.update(p.name.encode() + b"\0")
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _learn_spec(entry: Entry) -> dict[str, Any]:
    placeholder = "<data>" if _needs_preparation(entry) else str(entry.data.get("id"))
    return {
        "recipe_version": RECIPE_VERSION,
        "argv": learn_argv(entry, data=placeholder, output="<output>", checkpoint=None),
        "data": _data_spec(entry),
        "threads": entry.learn.get("threads"),
    }


def _data_spec(entry: Entry) -> dict[str, Any]:
    return {k: entry.data.get(k) for k in ("source", "id", "config", "split")}


def _evaluation_spec(entry: Entry, learned: Path) -> dict[str, Any]:
    return {
        "recipe_version": RECIPE_VERSION,
        "evaluate": entry.evaluate,
        "backbone": {k: entry.backbone.get(k) for k in ("library", "name")},
        "image_size": entry.data.get("image_size"),
        "threads": entry.learn.get("threads"),
        "learned": _file_hash(learned),
    }


@contextlib.contextmanager
def _restored_environ() -> Iterator[None]:
    """Undo environment changes made by the block (``priorzoo learn`` sets HF_HUB_OFFLINE for local runs,
    which would stop the push that follows in this process)."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


class _Builder:
    def __init__(self, opts: argparse.Namespace, log: Callable[[str], None]) -> None:
        self.opts = opts
        self.log = log

    # ------------------------------------------------------------------------------------ stages
    def learn(self, entry: Entry, paths: _Paths) -> Path:
        spec = _learn_spec(entry)
        fp = fingerprint(spec)
        state = _read_json(paths.state)
        if not self.opts.rebuild and state.get("learn") == fp and (paths.learned / "config.json").is_file():
            self.log(f"learn: reusing {paths.learned} (learned earlier with the same settings)")
            return paths.learned
        marker = paths.checkpoint / "build_fingerprint.json"
        if self.opts.rebuild or _read_json(marker).get("learn") != fp:
            shutil.rmtree(paths.checkpoint, ignore_errors=True)  # a checkpoint of other settings: start over
        elif paths.checkpoint.is_dir():
            self.log(f"learn: resuming from the checkpoint in {paths.checkpoint}")
        shutil.rmtree(paths.learned, ignore_errors=True)
        state.pop("learn", None)
        _write_json(paths.state, state)

        data_arg = str(entry.data.get("id"))
        if _needs_preparation(entry):
            dfp = fingerprint(_data_spec(entry))
            if state.get("data") == dfp and paths.data.is_dir():
                self.log(f"data: reusing {paths.data}")
            else:
                self.log(f"data: preparing {entry.data.get('name') or entry.data.get('id')} in {paths.data}")
                _recipes().prepare_data(entry.data, paths.data)
                state["data"] = dfp
                _write_json(paths.state, state)
            data_arg = str(paths.data)
        argv = learn_argv(
            entry,
            data=data_arg,
            output=str(paths.learned),
            checkpoint=str(paths.checkpoint),
            progress=self.opts.progress,
        )
        _write_json(marker, {"learn": fp})
        self.log("learn: priorzoo " + shlex.join(argv))
        from priorzoo.cli import main as priorzoo_main

        start = time.perf_counter()
        with _restored_environ(), _recipes().torch_threads(entry.learn.get("threads")):
            status = priorzoo_main(argv)
        if status != 0 or not (paths.learned / "config.json").is_file():
            raise RuntimeError(f"`priorzoo {argv[0]}` failed with exit status {status} (its message is above)")
        state["learn"] = fp
        _write_json(paths.state, state)
        shutil.rmtree(paths.checkpoint, ignore_errors=True)  # the learned prior is the resume point now
        self.log(f"learn: done in {time.perf_counter() - start:.1f} s")
        return paths.learned

    def evaluate(self, entry: Entry, paths: _Paths, learned: Path) -> dict[str, Any] | None:
        if entry.evaluate is None:
            return None
        fp = fingerprint(_evaluation_spec(entry, learned))
        saved = _read_json(paths.evaluation)
        if saved.get("fingerprint") == fp:
            self.log(f"evaluate: reusing {paths.evaluation} (same learned prior, same recipe)")
            return saved
        from priorzoo import PriorModel

        self.log(f"evaluate: {entry.evaluate['recipe']} …")
        start = time.perf_counter()
        prior = PriorModel.from_pretrained(learned)
        with _recipes().torch_threads(entry.learn.get("threads")):
            out = _recipes().evaluate(
                prior, entry.backbone, entry.evaluate, image_size=int(entry.data.get("image_size", 224))
            )
        out["fingerprint"] = fp
        _write_json(paths.evaluation, out)
        for r in out["results"]:
            self.log(f"evaluate:   {r['method']:<34} {r['metric']:<8} {r['value']}")
        self.log(f"evaluate: recommended λ = {out['recommended_scale']:g} ({time.perf_counter() - start:.1f} s)")
        return out

    def card(self, entry: Entry, paths: _Paths, learned: Path, evaluation: Mapping[str, Any] | None) -> Path:
        from priorzoo import PriorConfig, PriorModel
        from priorzoo.format.cards import render_card

        prior = PriorModel.from_pretrained(learned)
        cfg = prior.config
        backbone = dict(cfg.backbone)
        backbone.update({k: entry.backbone[k] for k in ("hub_id", "pretrained") if k in entry.backbone})
        source = dict(cfg.source)
        d = entry.data
        source["dataset"] = d.get("name") or d.get("id") or source.get("dataset")
        if d.get("source") == "hub":
            source["hub_id"] = d["id"]
            if d.get("config"):
                source["config"] = d["config"]
        else:
            source["bundled"] = d["source"]
        source["modality"] = "image" if entry.backbone["library"] == "timm" or "image_size" in d else "text"
        learning = {**cfg.learning, "built_by": "upload_scripts/build_zoo.py", "zoo_entry": entry.name}
        recommended = entry.recommended_scale
        results = [*entry.results, *(evaluation["results"] if evaluation else [])]
        new = dataclasses.replace(
            cfg, backbone=backbone, source=source, learning=learning, license=entry.license,
            recommended_scale=recommended if recommended is not None else cfg.recommended_scale, results=results,
        )  # fmt: skip
        if recommended is None and evaluation is not None and evaluation.get("recommended_scale") is not None:
            new.record_measured_scale(  # the card says which task λ was measured on, not the rule of thumb
                evaluation["recommended_scale"],
                measured_on=f"selected on validation by the `{entry.evaluate['recipe']}` recipe of "
                "upload_scripts/zoo_recipes.py (see the transfer results)",
            )
        folder = PriorModel(new, prior.mean, prior.variance, prior.cov_factor, buffers=prior.buffers).save_pretrained(
            paths.final,
            factor_dtype=entry.storage.get("factor_dtype"),
            max_shard_size=entry.storage.get("max_shard_size", "2GB"),
        )
        saved = PriorConfig.from_json_file(folder / "config.json")
        card = render_card(saved, repo_id=entry.repo_id, description=entry.description or None)
        (folder / "README.md").write_text(card, encoding="utf-8")
        self.log(f"card: wrote {folder} (README.md for {entry.repo_id})")
        return folder

    def push(self, entry: Entry, folder: Path) -> tuple[str, bool]:
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        from priorzoo.hub import upload_prior

        try:
            before: str | None = HfApi(token=self.opts.token).repo_info(entry.repo_id, revision=entry.revision).sha
        except (RepositoryNotFoundError, RevisionNotFoundError):
            before = None
        commit = upload_prior(
            folder,
            entry.repo_id,
            private=entry.private,
            token=self.opts.token,
            commit_message=f"build_zoo: {entry.name}",
            revision=entry.revision,
            subfolder=entry.subfolder,
        ).oid
        changed = commit != before
        where = f"{constants.ENDPOINT}/{entry.repo_id}"
        self.log(
            f"push: {'new commit ' + commit if changed else 'no change, the Hub already holds these files'} ({where})"
        )
        return commit, changed

    # ------------------------------------------------------------------------------------ driver
    def build(self, entry: Entry) -> EntryReport:
        paths = _Paths(Path(self.opts.output_dir) / entry.name)
        reasons = unmet_requirements(entry)
        if not reasons and not self.opts.dry_run:
            reasons = probe_hub(entry, self.opts.token)
        if reasons:
            detail = "needs " + "; and ".join(reasons)
            self.log(f"refused: {detail}. Build it where these are available: --only {entry.name}")
            return EntryReport(entry.name, "refused", detail)
        if self.opts.dry_run:
            return self.plan(entry, paths)
        learned = self.learn(entry, paths)
        evaluation = self.evaluate(entry, paths, learned)
        folder = self.card(entry, paths, learned, evaluation)
        if self.opts.no_push:
            return EntryReport(entry.name, "local", f"built {folder}, not pushed (--no-push)")
        commit, changed = self.push(entry, folder)
        return EntryReport(entry.name, "built" if changed else "unchanged", entry.repo_id, commit)

    def plan(self, entry: Entry, paths: _Paths) -> EntryReport:
        from huggingface_hub import constants

        spec = _learn_spec(entry)
        state = _read_json(paths.state)
        learned_ok = state.get("learn") == fingerprint(spec) and (paths.learned / "config.json").is_file()
        if learned_ok and not self.opts.rebuild:
            self.log(f"learn: would reuse {paths.learned}")
        else:
            if _needs_preparation(entry):
                self.log(f"data: would prepare {entry.data.get('name') or entry.data.get('id')} in {paths.data}")
            data = str(paths.data) if _needs_preparation(entry) else str(entry.data["id"])
            argv = learn_argv(entry, data=data, output=str(paths.learned), checkpoint=str(paths.checkpoint))
            self.log("learn: would run: priorzoo " + shlex.join(argv))
        if entry.evaluate is not None:
            reuse = learned_ok and not self.opts.rebuild
            reuse = reuse and _read_json(paths.evaluation).get("fingerprint") == fingerprint(
                _evaluation_spec(entry, paths.learned)
            )
            self.log(
                f"evaluate: would {'reuse ' + str(paths.evaluation) if reuse else 'run ' + entry.evaluate['recipe']}"
            )
        self.log(f"card: would write {paths.final} with a model card for {entry.repo_id}")
        if self.opts.no_push:
            self.log("push: skipped (--no-push)")
        else:
            self.log(
                f"push: would upload {paths.final} to {constants.ENDPOINT}/{entry.repo_id} as one commit "
                f"({'private' if entry.private else 'public'} if created; no commit when the files are unchanged)"
            )
        return EntryReport(entry.name, "planned", "dry run: nothing was written or pushed")


# ============================================================================================== CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_zoo.py",
        description="Learn, evaluate, card and push the priors of the zoo manifest (idempotent, resumable).",
    )
    p.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="the zoo manifest (default: %(default)s)")
    p.add_argument("--only", action="append", metavar="NAME", help="build only this entry (repeatable)")
    p.add_argument("--output-dir", default="build/zoo", help="where entries are built (default: %(default)s)")
    p.add_argument("--endpoint", default=None, help="Hub endpoint URL (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN / saved login)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done; write and push nothing")
    p.add_argument("--no-push", action="store_true", help="build the publishable folders, do not push")
    p.add_argument("--rebuild", action="store_true", help="relearn even when a prior with the same settings exists")
    p.add_argument("--skip-unavailable", action="store_true", help="refused entries do not fail the run")
    p.add_argument("--progress", action="store_true", help="show training progress bars")
    p.add_argument("--list", action="store_true", help="list the manifest's entries and exit")
    return p


def _use_endpoint(endpoint: str) -> None:
    """Point huggingface_hub at ``endpoint``; it reads HF_ENDPOINT once, at import."""
    hub = sys.modules.get("huggingface_hub")
    if hub is not None and hub.constants.ENDPOINT.rstrip("/") != endpoint.rstrip("/"):
        raise SystemExit(
            f"build_zoo.py: error: --endpoint {endpoint!r} cannot take effect: huggingface_hub was already "
            f"imported with endpoint {hub.constants.ENDPOINT!r}; run build_zoo.py as a script or set HF_ENDPOINT"
        )
    os.environ["HF_ENDPOINT"] = endpoint.rstrip("/")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the build (see the module docstring); returns the exit status.

    Example:
        >>> main(["--only", "test-resnet-digits-swag", "--dry-run"])  # doctest: +SKIP
        0
    """
    args = _parser().parse_args(argv)
    if args.endpoint:
        _use_endpoint(args.endpoint)
    try:
        entries = load_manifest(args.manifest)
    except ManifestError as err:
        print(f"build_zoo.py: error: {err}", file=sys.stderr)
        return 2
    if args.list:
        for e in entries:
            needs = unmet_requirements(e)
            here = "runs here" if not needs else "needs " + "; ".join(needs)
            print(f"{e.name:<42} {e.repo_id:<50} {here}")
        return 0
    if args.only:
        known = {e.name for e in entries}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            print(f"build_zoo.py: error: --only {unknown}: no such entry; entries: {sorted(known)}", file=sys.stderr)
            return 2
        entries = [e for e in entries if e.name in args.only]

    reports: list[EntryReport] = []
    for entry in entries:

        def log(message: str, name: str = entry.name) -> None:
            print(f"[{name}] {message}", flush=True)

        log(f"{entry.repo_id}" + (" (dry run)" if args.dry_run else ""))
        try:
            reports.append(_Builder(args, log).build(entry))
        except Exception as err:  # report and go on with the next entry
            traceback.print_exc(file=sys.stderr)
            log(f"failed: {type(err).__name__}: {err}")
            reports.append(EntryReport(entry.name, "failed", f"{type(err).__name__}: {err}"))

    print("\nsummary:")
    for r in reports:
        print(f"  {r.name:<42} {r.status:<9} {r.commit or r.detail}")
    bad = [r for r in reports if r.status == "failed" or (r.status == "refused" and not args.skip_unavailable)]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
