"""Getting prior folders to and from the Hugging Face Hub, on huggingface_hub's public API.

A prior on the Hub is a model repo, or a subfolder of one (several priors in one repo, like PEFT
adapters), holding the files of ``docs/format.md``: ``config.json``, then ``prior.safetensors`` or
``prior.safetensors.index.json`` plus every shard it names, and the ``README.md`` card. Everything here
goes through ``huggingface_hub``'s own client, so the usual machinery applies: ``HF_ENDPOINT``,
``HF_TOKEN`` / ``hf auth login`` / ``token=``, the shared cache (``HF_HUB_CACHE`` / ``cache_dir=``), offline
mode (``HF_HUB_OFFLINE=1`` / ``local_files_only=True``) and the ``HF_HUB_ETAG_TIMEOUT`` /
``HF_HUB_DOWNLOAD_TIMEOUT`` timeouts, used as the user set them. Nothing here changes huggingface_hub's
client or any other process-wide setting; :mod:`priorzoo.hub_limits` bounds priorzoo's own downloads.

- :func:`fetch_prior` / :func:`download_prior` resolve a local folder or ``"org/name"`` (+ ``revision``,
  ``subfolder``) to one prior. The revision is resolved to a commit **once** (``HfApi.model_info``), and
  every file of the prior is fetched at that commit (``hf_hub_download(revision=<commit>)``), so a push
  landing mid-download cannot mix two versions (huggingface_hub on its own resolves ``main`` with a HEAD and
  then GETs the ``main`` URL again). The files are then checked by the loader: when they belong to two saves
  (:class:`~priorzoo.errors.MixedPriorError`, e.g. a cache snapshot poisoned by an older client), they are
  fetched again at the same commit with ``force_download=True``, and refused if still mixed. Every failure
  to find the prior is a :class:`~priorzoo.errors.PriorNotFoundError` naming what, where, and why.
- :func:`upload_prior` pushes a saved prior folder as one ``create_commit`` (shards and all), creating the
  repo and branch when needed, deleting tensor files of an earlier save the new one no longer has,
  guarded by ``parent_commit``, optionally as a pull request; huggingface_hub skips the commit when nothing
  changed. It returns huggingface_hub's ``CommitInfo`` (``.oid``, ``.commit_url``, ``.pr_url``).

Listing the priors on the Hub is :mod:`priorzoo.hub_list`.

Example:
    >>> import tempfile, torch
    >>> from priorzoo import PriorModel
    >>> folder = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0).save_pretrained(tempfile.mkdtemp())
    >>> download_prior(str(folder)) == folder  # a local folder is used as it is
    True
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from priorzoo.errors import MixedPriorError, PriorNotFoundError
from priorzoo.format.files import (
    CARD_NAME,
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    clean_subfolder,
    is_prior_weights,
    prior_files,
    read_shard_index,
)
from priorzoo.hub_limits import HubLimits, HubTimeoutError, Progress, limits_from_env, run_bounded

__all__ = ["LIBRARY_NAME", "download_prior", "fetch_prior", "hub_api", "refuse_offline", "upload_prior"]

LIBRARY_NAME = "priorzoo"
"""The ``library_name`` of prior repos on the Hub (front matter of their card, and a tag)."""

T = TypeVar("T")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub could not be reached": OSError, and the base errors of the HTTP client
    huggingface_hub uses (httpx2 / httpx / requests, whichever are installed)."""
    import importlib

    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


_UNREACHABLE = _network_errors()


def _version() -> str:
    from priorzoo._version import __version__

    return __version__


def hub_api(token: str | bool | None) -> HfApi:
    return HfApi(token=token, library_name=LIBRARY_NAME, library_version=_version())


# --------------------------------------------------------------------------------------------- helpers
def _where(pretrained: str, revision: str | None, subfolder: str | None) -> str:
    extra = [f"revision {revision!r}"] if revision else []
    extra += [f"subfolder {subfolder!r}"] if subfolder else []
    return f"{pretrained!r}" + (f" ({', '.join(extra)})" if extra else "")


def _offline(local_files_only: bool) -> str | None:
    """Why we must not touch the network (``None``: we may). HF_HUB_OFFLINE counts even when it was set
    after huggingface_hub's import, which reads it only once into ``huggingface_hub.constants``."""
    if local_files_only:
        return "local_files_only=True"
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if constants.HF_HUB_OFFLINE or env.upper() in constants.ENV_VARS_TRUE_VALUES:
        return "HF_HUB_OFFLINE=1"
    return None


def refuse_offline(what: str) -> None:
    offline = _offline(False)
    if offline:
        raise OfflineModeIsEnabled(f"Can't {what}: you are offline ({offline}); unset HF_HUB_OFFLINE to go online")


def _cache(cache_dir: str | Path | None) -> str:
    return str(cache_dir or constants.HF_HUB_CACHE)


def _listing(files: Iterable[str], subfolder: str | None) -> str:
    """What the repo does hold, to explain why no prior was found there."""
    files = list(files)
    prefix = f"{subfolder}/" if subfolder else ""
    here = [f[len(prefix) :] for f in files if f.startswith(prefix)]
    text = f"files present: {here[:10] or 'none'}"
    if len(here) > 10:
        text += f" and {len(here) - 10} more"
    elsewhere = sorted(f[: -len(CONFIG_NAME) - 1] for f in files if f.endswith(f"/{CONFIG_NAME}"))
    elsewhere = [s for s in elsewhere if s != subfolder]
    if elsewhere:
        text += f"; priors may be in subfolder(s) {elsewhere[:10]}: pass `subfolder=`"
    return text


def _reason(err: BaseException, *, offline: str | None, cache_dir: str | Path | None, unreachable: bool = False) -> str:
    """Why a download failed, in one clause, from huggingface_hub's (or priorzoo's) exception; with
    ``unreachable``, ``err`` is why the Hub could not be asked and the cache did not hold the prior either."""
    cache = _cache(cache_dir)
    detail = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, HubTimeoutError):
        return (
            f"the Hub at {constants.ENDPOINT} did not answer in time ({detail}) and it is not in the cache "
            f"(cache_dir {cache!r})"
        )
    if unreachable:
        return (
            f"the Hub at {constants.ENDPOINT} could not be reached and it is not in the cache (cache_dir {cache!r}): "
            f"{type(err).__name__}: {detail}"
        )
    if isinstance(err, GatedRepoError):
        return "the repository is gated: accept its conditions on the Hub and pass a `token`"
    if isinstance(err, RepositoryNotFoundError):
        return (
            "repository not found (it does not exist, or it is private and no valid `token` was given; "
            f"Hub endpoint {constants.ENDPOINT})"
        )
    if isinstance(err, RevisionNotFoundError):
        return "revision not found (no such branch, tag or commit in the repository)"
    if isinstance(err, OfflineModeIsEnabled) or (isinstance(err, LocalEntryNotFoundError) and offline):
        return f"you are offline ({offline or 'HF_HUB_OFFLINE=1'}) and it is not in the cache (cache_dir {cache!r})"
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return f"HTTP error {err.response.status_code} from the Hub at {constants.ENDPOINT}: {detail}"
    return (
        f"the Hub at {constants.ENDPOINT} could not be reached and it is not in the cache (cache_dir {cache!r}): "
        f"{type(err).__name__}: {detail}"
    )


def _check_local(folder: Path, pretrained: str, subfolder: str | None) -> Path:
    where = f"local folder {_where(pretrained, None, subfolder)}"
    if not folder.is_dir():
        raise PriorNotFoundError(f"Can't find '{CONFIG_NAME}' at {where}: no such subfolder")
    if subfolder and not folder.resolve().is_relative_to(Path(pretrained).resolve()):
        raise ValueError(f"`subfolder` {subfolder!r} leads outside the folder {pretrained!r} (a link)")
    prior_files(folder, where=where)
    return folder


# --------------------------------------------------------------------------------------------- download
_SHARD_PATTERN = "prior-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"
"""``files.SHARD_RE`` as an fnmatch pattern, for ``snapshot_download(allow_patterns=…)``."""


class _Fetch:
    """One download of one prior's files at one commit: ``snapshot_download`` resolves the revision to a
    commit once (or reads the cache's ref offline) and fetches every file at that commit."""

    def __init__(
        self,
        name: str,
        sub: str | None,
        *,
        revision: str | None,
        token: str | bool | None,
        cache_dir: str | Path | None,
        offline: str | None,
        force: bool,
        cause: BaseException | None = None,
    ) -> None:
        self.name, self.sub, self.revision, self.token = name, sub, revision, token
        self.cache_dir, self.offline, self.force, self.cause = cache_dir, offline, force, cause
        self.commit: str | None = None

    def fail(self, filename: str, err: BaseException | None, reason: str | None = None) -> PriorNotFoundError:
        if reason is not None:
            pass
        elif self.cause is not None:  # the Hub could not be reached, and the cache does not hold it
            reason = _reason(self.cause, offline=None, cache_dir=self.cache_dir, unreachable=True)
        elif isinstance(err, LocalEntryNotFoundError) and self.offline is None and err.__cause__ is not None:
            reason = _reason(err.__cause__, offline=None, cache_dir=self.cache_dir, unreachable=True)
        else:
            assert err is not None
            reason = _reason(err, offline=self.offline, cache_dir=self.cache_dir)
        if isinstance(err, RepositoryNotFoundError) and not Path(self.name).exists():
            reason += f"; there is no local folder {self.name!r} either"
        where = _where(self.name, self.revision, self.sub)
        return PriorNotFoundError(f"Can't find '{filename}' at {where}: {reason}")

    def snapshot(self, progress: Progress | None) -> Path:
        """The snapshot folder of the commit, holding the prior's files that the repo has there."""
        patterns = [f"{self.sub}/{n}" if self.sub else n for n in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, CARD_NAME)]
        patterns.append(f"{self.sub}/{_SHARD_PATTERN}" if self.sub else _SHARD_PATTERN)
        if progress is not None:
            progress.begin(
                f"resolving {_where(self.name, self.revision, None)} to a commit",
                then=f"downloading the files of {_where(self.name, self.revision, self.sub)}",
            )
        try:
            folder = snapshot_download(
                self.name,
                revision=self.revision,
                allow_patterns=patterns,
                cache_dir=self.cache_dir,
                token=self.token,
                local_files_only=self.offline is not None,
                force_download=self.force,
                library_name=LIBRARY_NAME,
                library_version=_version(),
                tqdm_class=progress.tqdm_class if progress is not None else None,
            )
        except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, ValueError, *_UNREACHABLE) as err:
            raise self.fail(CONFIG_NAME, err) from err
        self.commit = Path(folder).name if _COMMIT_RE.fullmatch(Path(folder).name) else self.revision
        return Path(folder)

    def listing(self) -> str:
        """What the repo holds at the commit (best effort, online only), to explain a missing prior."""
        if self.offline is not None:
            return ""
        try:
            files = hub_api(self.token).list_repo_files(self.name, revision=self.commit or self.revision)
        except (HfHubHTTPError, *_UNREACHABLE):
            return ""
        return f" ({_listing(files, self.sub)})"

    def files(self, progress: Progress | None) -> Path:
        """Fetch config, tensors (one file, or index + every shard it names) and card at one commit; return
        the folder holding them."""
        snapshot = self.snapshot(progress)
        folder = snapshot / self.sub if self.sub else snapshot
        where = _where(self.name, self.revision, self.sub)
        if not (folder / CONFIG_NAME).is_file():
            if self.offline is not None:
                raise self.fail(CONFIG_NAME, LocalEntryNotFoundError("not cached"))
            raise self.fail(CONFIG_NAME, None, "the repo holds no prior there" + self.listing())
        if not (folder / WEIGHTS_NAME).is_file():
            if not (folder / INDEX_NAME).is_file():
                why = (
                    f"you are offline ({self.offline}) and they are not in the cache (cache_dir "
                    f"{_cache(self.cache_dir)!r})"
                    if self.offline
                    else f"the repo has a '{CONFIG_NAME}' but no tensors" + self.listing()
                )
                raise PriorNotFoundError(f"Can't find '{WEIGHTS_NAME}' or '{INDEX_NAME}' at {where}: {why}")
            for shard in sorted(set(read_shard_index(folder / INDEX_NAME).values())):
                if not (folder / shard).is_file():
                    raise PriorNotFoundError(
                        f"Can't find shard '{shard}' listed in '{INDEX_NAME}' at {where}: "
                        + (
                            f"you are offline ({self.offline}) and it is not in the cache"
                            if self.offline
                            else "it is not in the repo"
                        )
                    )
        return folder


def _download(
    name: str,
    sub: str | None,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | Path | None,
    offline: str | None,
    force: bool,
    limits: HubLimits | None,
) -> tuple[Path, str | None]:
    """The folder holding one prior's files of one commit, and that commit."""
    kwargs: dict[str, Any] = dict(revision=revision, token=token, cache_dir=cache_dir, force=force)
    if offline is not None:
        fetch = _Fetch(name, sub, offline=offline, **kwargs)
        return fetch.files(None), fetch.commit
    online = _Fetch(name, sub, offline=None, **kwargs)
    try:
        folder = run_bounded(online.files, limits, what=f"downloading {_where(name, revision, sub)}")
        return folder, online.commit
    except HubTimeoutError as err:
        cause = err
    # the Hub did not answer in time: a cached copy is what huggingface_hub itself falls back to when it
    # cannot reach the Hub
    fetch = _Fetch(name, sub, offline="unreachable", cause=cause, **kwargs)
    return fetch.files(None), fetch.commit


def fetch_prior(
    pretrained: str | os.PathLike[str],
    read: Callable[[Path], T],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    subfolder: str | None = None,
    force_download: bool = False,
    limits: HubLimits | None = None,
) -> T:
    """Find one prior (a local folder, or a Hub repo at one resolved commit) and return ``read(folder)``.

    ``read`` is the loader (``PriorModel.from_pretrained`` passes the folder reader that checks that every
    file belongs to one save). When it raises :class:`~priorzoo.errors.MixedPriorError` for files from the
    Hub cache, the files are downloaded again at the same commit with ``force_download=True`` and read once
    more; if they are still mixed the error is raised. A local folder is read as it is.

    Args:
        pretrained: a local folder or a Hub repo id (``"org/name"``).
        read: called with the folder holding ``config.json`` and the tensors; its result is returned.
        revision: branch, tag or commit id on the Hub (default ``main``), resolved to a commit once.
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the saved login, ``False`` sends none.
        cache_dir: huggingface_hub cache folder (default ``HF_HUB_CACHE``).
        local_files_only: use only the cache, never the network.
        subfolder: folder inside the repo (or local folder) that holds the prior.
        force_download: download every file again even when cached.
        limits: the stall rule of :mod:`priorzoo.hub_limits` (default: from ``PRIORZOO_HUB_*``).

    Raises:
        PriorNotFoundError: no prior there (repository, revision or file missing; offline and not cached;
            the Hub unreachable and nothing cached).
        MixedPriorError: the files still belong to two saves after a fresh download at the resolved commit
            (or offline, where nothing can be fetched again).

    Example:
        >>> fetch_prior("priorzoo/resnet50-imagenet-swag", lambda folder: folder.name)  # doctest: +SKIP
        'f3c1a0…'
    """
    name = os.fspath(pretrained)
    if not isinstance(name, str):
        raise TypeError(f"`pretrained` must be a folder path or a Hub repo id, received {pretrained!r}")
    if name == "":
        raise PriorNotFoundError("`pretrained` is empty: pass a prior folder or a Hub repo id ('org/name')")
    sub = clean_subfolder(subfolder)
    local = Path(name)
    if local.is_dir():
        return read(_check_local(local / sub if sub else local, name, sub))
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise PriorNotFoundError(
            f"Can't find a prior at {name!r}: it is neither an existing local folder nor a valid Hub repo id "
            f"('org/name'). {err}"
        ) from None
    offline = _offline(local_files_only)
    limits = limits or limits_from_env()  # a malformed PRIORZOO_HUB_* value is an error online and offline
    kwargs: dict[str, Any] = dict(token=token, cache_dir=cache_dir, limits=limits)
    folder, commit = _download(name, sub, revision=revision, offline=offline, force=force_download, **kwargs)
    try:
        return read(folder)
    except MixedPriorError as err:
        where = f"{_where(name, revision, sub)} at commit {commit}"
        if offline is not None:
            raise MixedPriorError(
                f"the cached copy of {where} mixes files of two saves and you are offline ({offline}): "
                f"go online to fetch it again. {err}"
            ) from err
        if force_download:
            raise MixedPriorError(f"{where} mixes files of two saves as downloaded: {err}") from err
        first = err
    folder, _ = _download(name, sub, revision=commit, offline=None, force=True, **kwargs)
    try:
        return read(folder)
    except MixedPriorError as err:
        raise MixedPriorError(
            f"{where} mixes files of two saves, in the cache ({first}) and again as downloaded afresh: {err}"
        ) from err


def _check_prior(folder: Path) -> Path:
    """Open a prior folder as the loader does (regular files, valid headers, every tensor file of the save
    ``config.json`` names: else :class:`~priorzoo.errors.MixedPriorError`) without reading the tensors; return
    the folder."""
    from priorzoo.format.serialization import open_prior_folder

    open_prior_folder(folder).close()
    return folder


def download_prior(
    pretrained: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    subfolder: str | None = None,
    force_download: bool = False,
) -> Path:
    """Return a local folder holding one prior's files, downloading them from the Hub when needed.

    ``pretrained`` is a local folder (returned as it is, joined with ``subfolder``, after checking that it
    holds a prior) or a Hub repo id. From a repo, ``revision`` (branch, tag or commit; default ``main``) is
    resolved to a commit once, and ``config.json``, ``prior.safetensors`` — or the index and every shard it
    lists — and ``README.md`` are all fetched at that commit, then opened as the loader opens them (headers,
    and every tensor file of the save ``config.json`` names; see :func:`fetch_prior`). Files go through the
    shared huggingface_hub cache, so a second call downloads nothing, and with ``HF_HUB_OFFLINE=1`` or
    ``local_files_only=True`` the cached copy is used without any request.

    Args:
        pretrained: a local folder or a Hub repo id (``"org/name"``).
        revision: branch, tag or commit id on the Hub (ignored for a local folder).
        token: Hub token; ``None`` uses the saved/``HF_TOKEN`` token, ``False`` sends none.
        cache_dir: huggingface_hub cache folder (default ``HF_HUB_CACHE``).
        local_files_only: use only the cache, never the network.
        subfolder: folder inside the repo (or local folder) that holds the prior.
        force_download: download every file again even when cached.

    Returns:
        The folder holding ``config.json`` and the tensors (inside the cache's snapshot of the commit).

    Raises:
        PriorNotFoundError: no prior there; the message says which file was looked for, where, and why
            (repository not found, revision not found, offline and not cached, the repo holds no prior…).
        PriorFormatError: the files are not a valid prior (a malformed shard index, bad tensors…).
        MixedPriorError: the files of the commit belong to two saves even when downloaded afresh.

    Example:
        >>> folder = download_prior("priorzoo/resnet50-imagenet-swag", revision="v1")  # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())  # doctest: +SKIP
        ['README.md', 'config.json', 'prior.safetensors']
    """
    sub = clean_subfolder(subfolder)
    name = os.fspath(pretrained)
    if isinstance(name, str) and Path(name).is_dir():
        return _check_local(Path(name) / sub if sub else Path(name), name, sub)
    return fetch_prior(
        pretrained,
        _check_prior,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        subfolder=subfolder,
        force_download=force_download,
    )


# --------------------------------------------------------------------------------------------- upload
def upload_prior(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Upload a saved prior folder to ``repo_id`` as one commit; return huggingface_hub's ``CommitInfo``.

    Creates the repo when missing (``private`` applies only then) and the branch ``revision`` when it does
    not exist yet (from ``main``). The commit (``HfApi.create_commit``) holds the prior's files only —
    ``config.json``, the safetensors file or index + all shards, ``README.md`` — under ``subfolder`` if
    given, and deletes the tensor files of an earlier save in that same (sub)folder that this save no longer
    has (shards after re-saving unsharded, the single file after re-saving sharded). It is made against the
    head it was compared with (``parent_commit``), so a concurrent push makes it fail instead of silently
    interleaving. huggingface_hub uploads no file the Hub already holds identically and, when nothing
    differs, makes no commit at all: the ``CommitInfo`` then names the current head, so pushing twice is
    harmless. With ``create_pr`` the change is opened as a pull request (``.pr_url``) and the branch is left
    as it is.

    Args:
        folder: a folder written by ``PriorModel.save_pretrained``.
        repo_id: ``"org/name"``.
        private: visibility of a newly created repo.
        token: Hub token with write access (``None``: ``HF_TOKEN`` or the saved login).
        commit_message: defaults to "Upload priorzoo prior".
        revision: target branch (default ``main``); created if missing.
        subfolder: folder inside the repo for this prior (several priors in one repo).
        create_pr: open a pull request with the change instead of committing to the branch.

    Returns:
        ``CommitInfo``: ``.oid`` (the commit now holding the prior), ``.commit_url``, ``.pr_url`` (with
        ``create_pr``).

    Raises:
        PriorNotFoundError: ``folder`` is not a complete prior folder.
        PriorFormatError: its shard index is malformed or names missing shards.
        ValueError: ``repo_id`` is not a valid repo id, or ``revision`` is a tag/commit, not a branch.
        huggingface_hub.errors.OfflineModeIsEnabled: HF_HUB_OFFLINE is set.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused (no write access, the branch moved…).

    Example:
        >>> info = upload_prior("./resnet50-swag", "me/resnet50-imagenet-swag", private=True)  # doctest: +SKIP
        >>> info.commit_url  # doctest: +SKIP
        'https://huggingface.co/me/resnet50-imagenet-swag/commit/f3c1…'
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PriorNotFoundError(f"Can't upload {str(folder)!r}: it is not a directory")
    names = prior_files(folder, where=f"Can't upload {str(folder)!r}: it", upload=True)
    validate_repo_id(repo_id)
    refuse_offline(f"upload to {repo_id!r}")
    sub = clean_subfolder(subfolder)
    api = hub_api(token)
    api.create_repo(repo_id, private=private, exist_ok=True)

    branch = revision or constants.DEFAULT_REVISION
    refs = api.list_repo_refs(repo_id)
    heads = {b.name: b.target_commit for b in refs.branches}
    if branch not in heads:
        if branch in {t.name for t in refs.tags} or _COMMIT_RE.fullmatch(branch):
            raise ValueError(f"`revision` must name a branch to push to; {branch!r} is a tag or a commit")
        if heads:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
            heads[branch] = api.repo_info(repo_id, revision=branch).sha
    head = heads.get(branch)

    def in_repo(name: str) -> str:
        return f"{sub}/{name}" if sub else name

    remote: list[str] = []
    if head is not None:
        with contextlib.suppress(EntryNotFoundError):  # no such subfolder yet: nothing to delete
            remote = [
                PurePosixPath(e.path).name
                for e in api.list_repo_tree(repo_id, path_in_repo=sub, revision=head)
                if hasattr(e, "blob_id")  # a RepoFile (a RepoFolder has no blob)
            ]
    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(path_in_repo=in_repo(n), path_or_fileobj=path) for n, path in names.items()
    ]
    operations += [
        CommitOperationDelete(path_in_repo=in_repo(n)) for n in sorted(remote) if is_prior_weights(n) and n not in names
    ]
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or "Upload priorzoo prior",
        revision=branch,
        create_pr=create_pr,
        parent_commit=head,
    )
