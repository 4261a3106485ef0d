"""Getting prior folders to and from the Hugging Face Hub.

A prior on the Hub is a model repo, or a subfolder of one (several priors in one repo, like PEFT
adapters), holding the files of ``docs/format.md``: ``config.json``, then ``prior.safetensors`` or
``prior.safetensors.index.json`` plus every shard it names, and the ``README.md`` card. Everything here
goes through ``huggingface_hub``'s own client, so the usual machinery applies: ``HF_ENDPOINT``,
``HF_TOKEN`` / ``token=``, the shared cache (``HF_HUB_CACHE`` / ``cache_dir=``) and offline mode
(``HF_HUB_OFFLINE=1`` / ``local_files_only=True``).

- :func:`download_prior` resolves a local folder or ``"org/name"`` (+ ``revision``, ``subfolder``) to a
  local folder holding exactly one prior's files. Every file after ``config.json`` is fetched at the
  commit ``config.json`` came from, so a push landing mid-download cannot mix two versions. Every failure
  is a :class:`~priorzoo.errors.PriorNotFoundError` that names what was looked for, where, and why.
- :func:`upload_prior` pushes a saved prior folder as one commit (shards and all), creating the repo and
  branch when needed, deleting shards of an earlier save that the new one no longer has, and making no
  commit at all when the repo already holds identical files.
- :func:`list_priors` lists the priors on the Hub (``library_name: priorzoo``).

Example:
    >>> import tempfile, torch
    >>> from priorzoo import PriorModel
    >>> folder = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0).save_pretrained(tempfile.mkdtemp())
    >>> download_prior(str(folder)) == folder  # a local folder is used as it is
    True
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    try_to_load_from_cache,
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

from priorzoo._network import HubTimeoutError, bounded
from priorzoo.errors import PriorNotFoundError
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

__all__ = ["LIBRARY_NAME", "download_prior", "list_priors", "upload_prior"]

LIBRARY_NAME = "priorzoo"
"""The ``library_name`` of prior repos on the Hub (front matter of their card, and a tag)."""

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def _version() -> str:
    from priorzoo._version import __version__

    return __version__


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


def _hashes(path: Path) -> tuple[int, str, str]:
    """(size, sha256, git blob sha1) of a file, streamed: what the Hub reports for LFS / regular files."""
    size = path.stat().st_size
    sha256, git = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha256.update(chunk)
            git.update(chunk)
    return size, sha256.hexdigest(), git.hexdigest()


def _same_content(local: Path, remote: Any) -> bool:
    """Whether a local file equals a remote ``RepoFile`` (LFS/Xet files by sha256, others by git oid)."""
    size, sha256, git_oid = _hashes(local)
    if remote.size != size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == sha256
    return remote.blob_id == git_oid


def _prior_files(folder: Path) -> dict[str, Path]:
    """A local prior folder's files to upload (name -> path); raise if it is not a complete prior or a file
    resolves outside it."""
    if not folder.is_dir():
        raise PriorNotFoundError(f"Can't upload {str(folder)!r}: it is not a directory")
    return prior_files(folder, where=f"Can't upload {str(folder)!r}: it", upload=True)


# --------------------------------------------------------------------------------------------- download
def _check_local(folder: Path, pretrained: str, subfolder: str | None) -> Path:
    where = f"local folder {_where(pretrained, None, subfolder)}"
    if not folder.is_dir():
        raise PriorNotFoundError(f"Can't find '{CONFIG_NAME}' at {where}: no such subfolder")
    if subfolder and not folder.resolve().is_relative_to(Path(pretrained).resolve()):
        raise ValueError(f"`subfolder` {subfolder!r} leads outside the folder {pretrained!r} (a link)")
    prior_files(folder, where=where)
    return folder


def _repo_listing(
    repo_id: str, revision: str | None, subfolder: str | None, token: str | bool | None, offline: str | None
) -> str:
    """Best-effort description of what the repo does hold, to explain why no prior was found."""
    if offline:
        return ""
    try:
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except (HfHubHTTPError, OSError):
        return ""
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


def _refuse_offline(what: str) -> None:
    offline = _offline(False)
    if offline:
        raise OfflineModeIsEnabled(f"Can't {what}: you are offline ({offline}); unset HF_HUB_OFFLINE to go online")


def _cache(cache_dir: str | Path | None) -> str:
    return str(cache_dir or constants.HF_HUB_CACHE)


def _reason(
    err: BaseException, *, offline: str | None, cache_dir: str | Path | None, listing: Callable[[], str]
) -> str:
    """Why a download failed, in one clause, from huggingface_hub's exception."""
    cache = _cache(cache_dir)
    if isinstance(err, HubTimeoutError):
        return (
            f"the Hub at {constants.ENDPOINT} could not be reached in time ({err}) and it is not in the cache "
            f"(cache_dir {cache!r}); set PRIORZOO_HUB_DEADLINE / PRIORZOO_HUB_READ_TIMEOUT for a slow link"
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
    if isinstance(err, LocalEntryNotFoundError):
        if offline:
            return f"you are offline ({offline}) and it is not in the cache (cache_dir {cache!r})"
        cause = err.__cause__ or err
        detail = (str(cause).strip().splitlines() or [""])[0]
        return (
            f"the Hub at {constants.ENDPOINT} could not be reached and it is not in the cache "
            f"(cache_dir {cache!r}): {type(cause).__name__}: {detail}"
        )
    if isinstance(err, EntryNotFoundError):
        listed = listing()
        return "the repo holds no prior there" + (f" ({listed})" if listed else "")
    if isinstance(err, OfflineModeIsEnabled):
        return f"you are offline (HF_HUB_OFFLINE=1) and it is not in the cache (cache_dir {cache!r})"
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else "?"
        detail = (str(err).strip().splitlines() or [""])[0]
        return f"HTTP error {status} from the Hub at {constants.ENDPOINT}: {detail}"
    return f"{type(err).__name__}: {err}"


def download_prior(
    pretrained: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    subfolder: str | None = None,
) -> Path:
    """Return a local folder holding one prior's files, downloading them from the Hub when needed.

    ``pretrained`` is a local folder (returned as it is, joined with ``subfolder``, after checking that it
    holds a prior) or a Hub repo id. From a repo, ``config.json`` is fetched at ``revision`` (branch, tag
    or commit; default ``main``), then ``prior.safetensors`` — or ``prior.safetensors.index.json`` and every
    shard it lists — and ``README.md`` when there is one, all at the commit ``config.json`` came from. Files
    go through the shared huggingface_hub cache, so a second call downloads nothing, and with
    ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` the cached copy is used without any request.

    Args:
        pretrained: a local folder or a Hub repo id (``"org/name"``).
        revision: branch, tag or commit id on the Hub (ignored for a local folder).
        token: Hub token; ``None`` uses the saved/``HF_TOKEN`` token, ``False`` sends none.
        cache_dir: huggingface_hub cache folder (default ``HF_HUB_CACHE``).
        local_files_only: use only the cache, never the network.
        subfolder: folder inside the repo (or local folder) that holds the prior.

    Returns:
        The folder holding ``config.json`` and the tensors (inside the cache's snapshot for a repo).

    Raises:
        PriorNotFoundError: no prior there; the message says which file was looked for, where, and why
            (repository not found, revision not found, offline and not cached, the repo holds no prior…).
        PriorFormatError: the repo's shard index is malformed.

    Example:
        >>> folder = download_prior("priorzoo/resnet50-imagenet-swag", revision="v1")  # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())  # doctest: +SKIP
        ['README.md', 'config.json', 'prior.safetensors']
    """
    sub = clean_subfolder(subfolder)
    name = os.fspath(pretrained)
    if not isinstance(name, str):
        raise TypeError(f"`pretrained` must be a folder path or a Hub repo id, received {pretrained!r}")
    local = Path(name)
    if local.is_dir():
        return _check_local(local / sub if sub else local, name, sub)
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise PriorNotFoundError(
            f"Can't find a prior at {name!r}: it is neither an existing local folder nor a valid Hub repo id "
            f"('org/name'). {err}"
        ) from None

    offline = _offline(local_files_only)
    try:
        with bounded():
            return _download(name, sub, revision=revision, token=token, cache_dir=cache_dir, offline=offline)
    except PriorNotFoundError as err:
        if offline is not None or not isinstance(err.__cause__, HubTimeoutError):
            raise
        try:  # the Hub did not answer in time: a cached copy is what huggingface_hub would fall back to
            return _download(name, sub, revision=revision, token=token, cache_dir=cache_dir, offline="unreachable")
        except PriorNotFoundError:
            pass
        raise


def _download(
    name: str,
    sub: str | None,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | Path | None,
    offline: str | None,
) -> Path:
    """:func:`download_prior` for a repo id (``offline``: why the network must not be used, or ``None``)."""
    common: dict[str, Any] = dict(
        repo_id=name,
        subfolder=sub,
        token=token,
        cache_dir=cache_dir,
        local_files_only=offline is not None,
        library_name=LIBRARY_NAME,
        library_version=_version(),
    )

    def fail(filename: str, rev: str | None, err: BaseException) -> PriorNotFoundError:
        def listing() -> str:
            return _repo_listing(name, rev, sub, token, offline)

        reason = _reason(err, offline=offline, cache_dir=cache_dir, listing=listing)
        if isinstance(err, RepositoryNotFoundError) and not Path(name).exists():
            reason += f"; there is no local folder {name!r} either"
        return PriorNotFoundError(f"Can't find '{filename}' at {_where(name, rev, sub)}: {reason}")

    try:
        config_path = Path(hf_hub_download(filename=CONFIG_NAME, revision=revision, **common))
    except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as err:
        raise fail(CONFIG_NAME, revision, err) from err

    # pin the rest to the commit config.json was resolved to: …/snapshots/<commit>/<subfolder>/config.json
    snapshot = config_path.parent
    for _ in sub.split("/") if sub else ():
        snapshot = snapshot.parent
    commit = snapshot.name if _COMMIT_RE.fullmatch(snapshot.name) else revision

    def fetch(filename: str, *, optional: bool = False) -> Path | None:
        """Path of a file at ``commit``; ``None`` when it does not exist there (known from the cache's
        record of missing files, or a 404)."""
        if commit is not None and _COMMIT_RE.fullmatch(commit):
            cached = try_to_load_from_cache(
                name, f"{sub}/{filename}" if sub else filename, cache_dir=cache_dir, revision=commit
            )
            if isinstance(cached, str):
                return Path(cached)
            if cached is not None:  # the cache recorded a 404 for this file at this commit
                return None
        try:
            return Path(hf_hub_download(filename=filename, revision=commit, **common))
        except EntryNotFoundError as err:
            # a 404 says the file is not there; a cache miss offline leaves the question to the caller
            if isinstance(err, LocalEntryNotFoundError) and not optional and offline is None:
                raise fail(filename, revision, err) from err
            return None
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise fail(filename, revision, err) from err

    if fetch(WEIGHTS_NAME) is None:
        index_path = fetch(INDEX_NAME)
        if index_path is None:
            listed = _repo_listing(name, commit, sub, token, offline)
            why = (
                f"you are offline ({offline}) and they are not in the cache (cache_dir {_cache(cache_dir)!r})"
                if offline
                else f"the repo has a '{CONFIG_NAME}' but no tensors" + (f" ({listed})" if listed else "")
            )
            raise PriorNotFoundError(
                f"Can't find '{WEIGHTS_NAME}' or '{INDEX_NAME}' at {_where(name, revision, sub)}: {why}"
            )
        for shard in sorted(set(read_shard_index(index_path).values())):
            if fetch(shard) is None:
                raise PriorNotFoundError(
                    f"Can't find shard '{shard}' listed in '{INDEX_NAME}' at {_where(name, revision, sub)}: "
                    + (
                        f"you are offline ({offline}) and it is not in the cache"
                        if offline
                        else "it is not in the repo"
                    )
                )
    fetch(CARD_NAME, optional=True)
    return config_path.parent


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
) -> str:
    """Upload a saved prior folder to ``repo_id`` as one commit; return the commit id.

    Creates the repo when missing (``private`` applies only then) and the branch ``revision`` when it does
    not exist yet (from ``main``). The commit holds the prior's files only — ``config.json``, the
    safetensors file or index + all shards, ``README.md`` — under ``subfolder`` if given, and deletes the
    prior tensor files of an earlier save in that same (sub)folder that this save no longer has (e.g.
    shards after re-saving unsharded). Files already identical on the Hub (same size and sha256 / git
    oid) are not re-uploaded; if nothing differs, no commit is made and the current head commit is
    returned, so pushing twice is harmless. The commit is made against the head it was compared with
    (``parent_commit``), so a concurrent push makes it fail instead of silently interleaving.

    Args:
        folder: a folder written by ``PriorModel.save_pretrained``.
        repo_id: ``"org/name"``.
        private: visibility of a newly created repo.
        token: Hub token with write access (``None``: the saved/``HF_TOKEN`` token).
        commit_message: defaults to "Upload priorzoo prior".
        revision: target branch (default ``main``); created if missing.
        subfolder: folder inside the repo for this prior (several priors in one repo).
        create_pr: open a pull request with the change instead of committing to the branch.

    Returns:
        The 40-hex commit id now holding the prior (the pull request's commit with ``create_pr``).

    Raises:
        PriorNotFoundError: ``folder`` is not a complete prior folder.
        PriorFormatError: its shard index is malformed or names missing shards.
        ValueError: ``repo_id`` is not a valid repo id, or ``revision`` is a tag/commit, not a branch.
        huggingface_hub.errors.OfflineModeIsEnabled: HF_HUB_OFFLINE is set.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused (no write access, …).

    Example:
        >>> upload_prior("./resnet50-swag", "me/resnet50-imagenet-swag", private=True)  # doctest: +SKIP
        'f3c1…'
    """
    folder = Path(folder)
    names = _prior_files(folder)
    validate_repo_id(repo_id)
    _refuse_offline(f"upload to {repo_id!r}")
    with bounded():
        return _upload(folder, names, repo_id, private, token, commit_message, revision, subfolder, create_pr)


def _upload(
    folder: Path,
    names: dict[str, Path],
    repo_id: str,
    private: bool | None,
    token: str | bool | None,
    commit_message: str | None,
    revision: str | None,
    subfolder: str | None,
    create_pr: bool,
) -> str:
    sub = clean_subfolder(subfolder)
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=_version())
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

    remote: dict[str, Any] = {}
    if head is not None:
        try:
            for entry in api.list_repo_tree(repo_id, path_in_repo=sub, revision=head):
                if hasattr(entry, "blob_id"):  # a RepoFile (RepoFolder has no blob)
                    remote[PurePosixPath(entry.path).name] = entry
        except EntryNotFoundError:  # the subfolder does not exist yet
            pass

    def in_repo(name: str) -> str:
        return f"{sub}/{name}" if sub else name

    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(path_in_repo=in_repo(n), path_or_fileobj=path)
        for n, path in names.items()
        if n not in remote or not _same_content(path, remote[n])
    ]
    operations += [
        CommitOperationDelete(path_in_repo=in_repo(n)) for n in sorted(remote) if is_prior_weights(n) and n not in names
    ]
    if not operations and head is not None:
        return head
    info = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or "Upload priorzoo prior",
        revision=branch,
        create_pr=create_pr,
        parent_commit=head,
    )
    return info.oid


# --------------------------------------------------------------------------------------------- discovery
def list_priors(
    *,
    search: str | None = None,
    author: str | None = None,
    token: str | bool | None = None,
    limit: int | None = None,
) -> list[Any]:
    """List the priors on the Hub: model repos whose card says ``library_name: priorzoo``.

    Args:
        search: substring of the repo id.
        author: user or organisation.
        token: Hub token (private repos you can see are included).
        limit: at most this many results.

    Returns:
        ``huggingface_hub.ModelInfo`` objects (``.id``, ``.tags``, ``.card_data`` with ``base_model`` …).

    Raises:
        huggingface_hub.errors.OfflineModeIsEnabled: HF_HUB_OFFLINE is set.
        huggingface_hub.errors.HfHubHTTPError: the Hub could not answer.

    Example:
        >>> [m.id for m in list_priors(author="priorzoo")]  # doctest: +SKIP
        ['priorzoo/resnet50-imagenet-swag', 'priorzoo/vit-b16-imagenet-swag']
    """
    _refuse_offline("list the priors on the Hub")
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=_version())
    with bounded():
        infos = api.list_models(filter=LIBRARY_NAME, search=search, author=author, limit=limit, cardData=True)
        return [i for i in infos if i.library_name == LIBRARY_NAME or LIBRARY_NAME in (i.tags or [])]
