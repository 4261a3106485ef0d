"""priorzoo.hub against a local Hub-protocol server, through huggingface_hub's real client (no mocks)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, patch_hf_env, set_hf_offline
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from safetensors.torch import load_file, save_file

from priorzoo import PriorModel
from priorzoo.errors import MixedPriorError, PriorFormatError, PriorNotFoundError
from priorzoo.hub import download_prior, fetch_prior, upload_prior
from priorzoo.hub_list import list_priors

CARD = "---\nlibrary_name: priorzoo\ntags:\n- priorzoo\n- bayesian-prior\n---\n# A prior\n"
SHA = re.compile(r"[0-9a-f]{40}")


def write_prior(folder: Path, *, seed: int = 0, shards: int = 1, card: bool = True) -> Path:
    """A prior folder written by ``save_pretrained``: config.json, tensors (one file, or an index + one shard
    per layer), and a short card."""
    g = torch.Generator().manual_seed(seed)
    names = [f"layer{i}.weight" for i in range(max(shards, 2))]
    prior = PriorModel.from_tensors(
        {n: torch.randn(3, 4, generator=g) for n in names},
        variance={n: torch.rand(3, 4, generator=g) + 0.1 for n in names},
        source={"seed": seed},
    )
    prior.save_pretrained(folder, max_shard_size="2GB" if shards == 1 else 96, card=False)
    assert len(list(folder.glob("prior-*-of-*.safetensors"))) == (0 if shards == 1 else shards)
    if card:
        (folder / "README.md").write_text(CARD)
    return folder


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def api(hub_server: HubServer) -> HfApi:
    return HfApi(token=hub_server.token)


@pytest.fixture
def token_env(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Log in the way users do: HF_TOKEN in the environment."""
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    return hub_server.token


# --------------------------------------------------------------------------------------------- round trips
def test_upload_then_download_gives_identical_files(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    local = write_prior(tmp_path / "p")
    info = upload_prior(local, "org/prior")
    assert isinstance(info, CommitInfo) and SHA.fullmatch(info.oid)
    assert info.commit_url == f"{hub_server.url}/org/prior/commit/{info.oid}" and info.pr_url is None
    commit = info.oid
    assert hub_server.commit_count("org/prior") == 2  # initial commit + exactly one upload commit
    assert HfApi().model_info("org/prior").sha == commit

    folder = download_prior("org/prior")
    assert contents(folder) == contents(local)
    assert folder.name == commit  # the cache's snapshot of that commit
    assert sorted(hub_server.files("org/prior")) == [".gitattributes", "README.md", "config.json", "prior.safetensors"]


def test_only_prior_files_are_uploaded(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    local = write_prior(tmp_path / "p", card=False)
    (local / "notes.txt").write_text("scratch")
    upload_prior(local, "org/prior")
    assert sorted(hub_server.files("org/prior")) == [".gitattributes", "config.json", "prior.safetensors"]
    assert sorted(p.name for p in download_prior("org/prior").iterdir()) == ["config.json", "prior.safetensors"]


def test_sharded_prior_uploads_and_downloads_as_a_unit(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    sharded = write_prior(tmp_path / "sharded", shards=3)
    upload_prior(sharded, "org/big")
    assert hub_server.commit_count("org/big") == 2  # index + 3 shards + config + card in one commit
    folder = download_prior("org/big")
    assert contents(folder) == contents(sharded)
    assert "prior.safetensors" not in contents(folder)

    # re-saved unsharded: the stale index and shards go away in the same commit that adds the new file
    single = write_prior(tmp_path / "single", seed=1)
    commit = upload_prior(single, "org/big").oid
    assert hub_server.commit_count("org/big") == 3
    assert sorted(hub_server.files("org/big")) == [".gitattributes", "README.md", "config.json", "prior.safetensors"]
    assert contents(download_prior("org/big", revision=commit)) == contents(single)


def test_pinned_revisions_commit_branch_and_tag(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    v1, v2, v3 = (write_prior(tmp_path / f"v{i}", seed=i) for i in (1, 2, 3))
    c1 = upload_prior(v1, "org/prior").oid
    c2 = upload_prior(v2, "org/prior", revision="dev").oid  # creates the branch from main
    c3 = upload_prior(v3, "org/prior").oid
    assert len({c1, c2, c3}) == 3
    HfApi().create_tag("org/prior", tag="v1.0", revision=c1)

    assert contents(download_prior("org/prior")) == contents(v3)
    assert contents(download_prior("org/prior", revision="dev")) == contents(v2)
    assert contents(download_prior("org/prior", revision=c1)) == contents(v1)
    assert contents(download_prior("org/prior", revision="v1.0")) == contents(v1)
    assert contents(download_prior("org/prior", revision="main")) == contents(v3)
    with pytest.raises(ValueError, match="must name a branch"):
        upload_prior(v2, "org/prior", revision="v1.0")


def test_two_priors_in_subfolders_of_one_repo(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    a, b = write_prior(tmp_path / "a", seed=1, shards=2), write_prior(tmp_path / "b", seed=2)
    upload_prior(a, "org/zoo", subfolder="resnet/swag")
    upload_prior(b, "org/zoo", subfolder="vit")
    assert contents(download_prior("org/zoo", subfolder="resnet/swag")) == contents(a)
    assert contents(download_prior("org/zoo", subfolder="vit/")) == contents(b)

    # re-saving "resnet/swag" unsharded deletes its shards only, never the other prior's files
    upload_prior(write_prior(tmp_path / "a2", seed=3), "org/zoo", subfolder="resnet/swag")
    files = sorted(hub_server.files("org/zoo"))
    assert [f for f in files if f.startswith("vit/")] == ["vit/README.md", "vit/config.json", "vit/prior.safetensors"]
    assert "resnet/swag/prior.safetensors.index.json" not in files

    with pytest.raises(PriorNotFoundError, match=r"subfolder\(s\) \['resnet/swag', 'vit'\]"):
        download_prior("org/zoo")  # nothing at the root: the message points at the subfolders


def test_private_repo_needs_the_token(hub_server: HubServer, tmp_path: Path) -> None:
    local = write_prior(tmp_path / "p")
    upload_prior(local, "me/secret", private=True, token=hub_server.token)
    assert HfApi(token=hub_server.token).model_info("me/secret").private
    with pytest.raises(PriorNotFoundError, match=r"repository not found.*private"):
        download_prior("me/secret")
    with pytest.raises(PriorNotFoundError, match="repository not found"):
        download_prior("me/secret", token=hub_server.add_user("stranger"))
    assert contents(download_prior("me/secret", token=hub_server.token)) == contents(local)


def test_pull_request_leaves_the_branch_alone(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    first = upload_prior(write_prior(tmp_path / "v1", seed=1), "org/prior").oid
    proposal = write_prior(tmp_path / "v2", seed=2)
    pr = upload_prior(proposal, "org/prior", create_pr=True)
    assert pr.pr_url == f"{hub_server.url}/org/prior/discussions/1" and pr.pr_revision == "refs/pr/1"
    pr_commit = pr.oid
    assert HfApi().model_info("org/prior").sha == first
    assert contents(download_prior("org/prior", revision="refs/pr/1")) == contents(proposal)
    assert download_prior("org/prior", revision="refs/pr/1").name == pr_commit


# --------------------------------------------------------------------------------------------- one commit
def push_once_before(server: HubServer, path_part: str, method: str, repo_id: str, files: dict[str, bytes]) -> list:
    """Make ``server`` commit ``files`` to ``repo_id`` (as another client's push) just before the first
    ``method`` request whose path contains ``path_part`` is answered; returns the list that receives the commit."""
    pushed: list[str] = []

    def hook(m: str, path: str) -> None:
        if not pushed and m == method and path_part in path:
            pushed.append(server.push(repo_id, files, message="a concurrent push"))

    server.on_request = hook
    return pushed


def test_a_push_landing_between_resolving_and_downloading_cannot_mix_commits(
    hub_server: HubServer, token_env: str, tmp_path: Path
) -> None:
    v1, v2 = write_prior(tmp_path / "v1", seed=1, shards=2), write_prior(tmp_path / "v2", seed=2, shards=2)
    first = upload_prior(v1, "org/prior").oid
    # huggingface_hub alone resolves `main` with a HEAD, then GETs the `main` URL: the push lands in between
    pushed = push_once_before(
        hub_server, "/resolve/", "GET", "org/prior", {n: p.read_bytes() for n, p in contents_paths(v2)}
    )
    folder = download_prior("org/prior")
    assert pushed, "the concurrent push never happened"
    assert folder.name == first and contents(folder) == contents(v1)  # every file of the resolved commit
    hub_server.on_request = None
    again = download_prior("org/prior")  # the next call sees the new commit, whole
    assert again.name == pushed[0] and contents(again) == contents(v2)


def contents_paths(folder: Path) -> list[tuple[str, Path]]:
    return [(p.name, p) for p in sorted(folder.iterdir()) if p.is_file()]


def test_a_mixed_snapshot_in_the_cache_is_fetched_again_at_the_same_commit(
    hub_server: HubServer, token_env: str, tmp_path: Path
) -> None:
    v1, v2 = write_prior(tmp_path / "v1", seed=1), write_prior(tmp_path / "v2", seed=2)
    commit = upload_prior(v1, "org/prior").oid
    snapshot = download_prior("org/prior")
    # poison the cache as an older client racing a push would: v2's config stored under v1's commit
    blob = (snapshot / "config.json").resolve()
    blob.chmod(0o644)
    blob.write_bytes((v2 / "config.json").read_bytes())
    reads: list[dict] = []

    def read(folder: Path) -> bytes:
        config = json.loads((folder / "config.json").read_text())
        reads.append(config)
        if config != json.loads((v1 / "config.json").read_text()):
            raise MixedPriorError(f"`config.json` of another save in {folder}")
        return (folder / "prior.safetensors").read_bytes()

    before = len(hub_server.requests)
    assert fetch_prior("org/prior", read) == (v1 / "prior.safetensors").read_bytes()
    assert len(reads) == 2  # the poisoned copy, then the one fetched again
    assert any(m == "GET" and f"/resolve/{commit}/config.json" in p for m, p in hub_server.requests[before:])
    assert contents(download_prior("org/prior", revision=commit)) == contents(v1)  # the cache is healed


@pytest.mark.parametrize("reader", ["from_pretrained", "download_prior"])
def test_the_loader_finds_a_poisoned_cache_snapshot_and_it_is_fetched_again(
    hub_server: HubServer, token_env: str, tmp_path: Path, reader: str
) -> None:
    v1, v2 = write_prior(tmp_path / "v1", seed=1, shards=2), write_prior(tmp_path / "v2", seed=2, shards=2)
    commit = upload_prior(v1, "org/prior").oid
    snapshot = download_prior("org/prior")
    # what huggingface_hub alone leaves when a push lands between its HEAD and its GET: the next save's
    # config.json (another save id) stored under the old commit's snapshot
    blob = (snapshot / "config.json").resolve()
    blob.chmod(0o644)
    blob.write_bytes((v2 / "config.json").read_bytes())
    with pytest.raises(MixedPriorError):
        PriorModel.from_pretrained(snapshot)  # the loader sees it: the save ids differ

    before = len(hub_server.requests)
    if reader == "from_pretrained":
        loaded = PriorModel.from_pretrained("org/prior")
        assert torch.equal(loaded.mean["layer0.weight"], PriorModel.from_pretrained(v1).mean["layer0.weight"])
    else:
        assert download_prior("org/prior") == snapshot
    assert contents(snapshot) == contents(v1)  # healed in the cache, at the same commit
    assert ("GET", f"/org/prior/resolve/{commit}/config.json") in hub_server.requests[before:]


def test_a_prior_that_is_still_mixed_after_a_fresh_download_is_refused(
    hub_server: HubServer, token_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_prior(write_prior(tmp_path / "v1", seed=1), "org/prior")

    def read(folder: Path) -> None:
        raise MixedPriorError("`prior.safetensors` carries save id b, `config.json` names a")

    with pytest.raises(MixedPriorError, match=r"'org/prior' at commit [0-9a-f]{40} mixes files of two saves, in "):
        fetch_prior("org/prior", read)
    with pytest.raises(MixedPriorError, match="as downloaded: "):
        fetch_prior("org/prior", read, force_download=True)
    set_hf_offline(monkeypatch)
    with pytest.raises(MixedPriorError, match=r"you are offline \(HF_HUB_OFFLINE=1\): go online to fetch it again"):
        fetch_prior("org/prior", read)


def test_a_push_landing_before_the_commit_is_refused_by_parent_commit(
    hub_server: HubServer, token_env: str, tmp_path: Path
) -> None:
    upload_prior(write_prior(tmp_path / "v1", seed=1), "org/prior")
    other = push_once_before(hub_server, "/commit/", "POST", "org/prior", {"notes.txt": b"someone else"})
    with pytest.raises(HfHubHTTPError, match="412"):
        upload_prior(write_prior(tmp_path / "v2", seed=2), "org/prior")
    assert other and HfApi().model_info("org/prior").sha == other[0]  # nothing interleaved on top of it


def test_switching_layouts_deletes_the_other_layouts_files(
    hub_server: HubServer, token_env: str, tmp_path: Path
) -> None:
    upload_prior(write_prior(tmp_path / "single", seed=1), "org/prior")
    upload_prior(write_prior(tmp_path / "sharded", seed=2, shards=3), "org/prior")
    assert sorted(hub_server.files("org/prior")) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "prior-00001-of-00003.safetensors",
        "prior-00002-of-00003.safetensors",
        "prior-00003-of-00003.safetensors",
        "prior.safetensors.index.json",
    ]
    upload_prior(write_prior(tmp_path / "two", seed=3, shards=2), "org/prior")  # 3 shards -> 2: the third goes
    assert "prior-00003-of-00003.safetensors" not in hub_server.files("org/prior")


# --------------------------------------------------------------------------------------------- idempotency
def test_second_upload_of_an_unchanged_folder_makes_no_commit(
    hub_server: HubServer, token_env: str, tmp_path: Path
) -> None:
    local = write_prior(tmp_path / "p", shards=2)
    first = upload_prior(local, "org/prior", subfolder="x").oid
    before = len(hub_server.requests)
    assert upload_prior(local, "org/prior", subfolder="x").oid == first
    assert hub_server.commit_count("org/prior") == 2
    assert not [r for r in hub_server.requests[before:] if r[0] == "POST" and "/commit/" in r[1]]

    # one changed shard: one new commit that carries just that file
    shard = local / "prior-00002-of-00002.safetensors"
    save_file({k: torch.ones(3, 4) for k in load_file(shard)}, str(shard), metadata={"format": "pt"})
    second = upload_prior(local, "org/prior", subfolder="x").oid
    assert second != first
    assert hub_server.commit_count("org/prior") == 3
    changed = [k for k, v in hub_server.files("org/prior").items() if hub_server.files("org/prior", first).get(k) != v]
    assert changed == ["x/prior-00002-of-00002.safetensors"]


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT
def test_idempotency_holds_for_lfs_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # as on the real Hub, *.safetensors go through LFS and the tree reports their sha256, not a git oid
    with HubServer(lfs_suffixes=(".safetensors",)) as server:
        patch_hf_env(monkeypatch, server.url, tmp_path / "home")
        local = write_prior(tmp_path / "p", shards=2)
        first = upload_prior(local, "org/lfs", token=server.token).oid
        tree = HfApi(token=server.token).list_repo_tree("org/lfs")
        assert {e.path for e in tree if getattr(e, "lfs", None)} == {
            "prior-00001-of-00002.safetensors",
            "prior-00002-of-00002.safetensors",
        }
        assert upload_prior(local, "org/lfs", token=server.token).oid == first
        assert server.commit_count("org/lfs") == 2
        assert contents(download_prior("org/lfs")) == contents(local)


# --------------------------------------------------------------------------------------------- offline & cache
def test_offline_after_one_download(
    hub_server: HubServer, token_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_prior(write_prior(tmp_path / "a", shards=3), "org/sharded")
    upload_prior(write_prior(tmp_path / "b"), "org/single", revision="v2")
    online = [download_prior("org/sharded"), download_prior("org/single", revision="v2")]
    before = len(hub_server.requests)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub's import: still honoured
    assert [download_prior("org/sharded"), download_prior("org/single", revision="v2")] == online
    set_hf_offline(monkeypatch)  # and the way huggingface_hub sees it when set before import
    assert download_prior("org/sharded") == online[0]
    set_hf_offline(monkeypatch, False)
    assert download_prior("org/single", revision="v2", local_files_only=True) == online[1]
    assert len(hub_server.requests) == before  # not a single request


def test_second_online_download_fetches_nothing_new(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    upload_prior(write_prior(tmp_path / "a", shards=2, card=False), "org/sharded")
    download_prior("org/sharded")
    before = len(hub_server.requests)
    download_prior("org/sharded")
    # one request to resolve `main` to a commit; every file of that commit is in the cache
    assert hub_server.requests[before:] == [("GET", "/api/models/org/sharded/revision/main")]


def test_download_into_a_given_cache_dir(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    upload_prior(write_prior(tmp_path / "a"), "org/prior")
    folder = download_prior("org/prior", cache_dir=tmp_path / "cache")
    assert folder.is_relative_to(tmp_path / "cache")


# --------------------------------------------------------------------------------------------- local folders
def test_local_folder_is_returned_as_is(tmp_path: Path) -> None:
    local = write_prior(tmp_path / "p")
    assert download_prior(str(local)) == local
    assert download_prior(tmp_path, subfolder="p") == local
    (tmp_path / "empty").mkdir()
    with pytest.raises(PriorNotFoundError, match="not a prior folder"):
        download_prior(tmp_path / "empty")
    with pytest.raises(PriorNotFoundError, match="no such subfolder"):
        download_prior(local, subfolder="nope")


# --------------------------------------------------------------------------------------------- failures
def test_repo_missing(hub_server: HubServer) -> None:
    msg = r"Can't find 'config.json' at 'org/missing': repository not found .*no local folder 'org/missing' either"
    with pytest.raises(PriorNotFoundError, match=msg):
        download_prior("org/missing")


def test_revision_missing(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    upload_prior(write_prior(tmp_path / "p"), "org/prior")
    with pytest.raises(PriorNotFoundError, match=r"at 'org/prior' \(revision 'v9'\): revision not found"):
        download_prior("org/prior", revision="v9")


def test_offline_with_nothing_cached(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    set_hf_offline(monkeypatch)
    with pytest.raises(PriorNotFoundError, match=r"offline \(HF_HUB_OFFLINE=1\) and it is not in the cache"):
        download_prior("org/prior")
    with pytest.raises(PriorNotFoundError, match=r"offline \(local_files_only=True\)"):
        download_prior("org/prior", local_files_only=True)
    assert hub_server.requests == []


def test_upload_and_listing_refuse_to_go_online_when_offline(
    hub_server: HubServer, token_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineModeIsEnabled, match=r"Can't upload to 'org/p': you are offline"):
        upload_prior(write_prior(tmp_path / "p"), "org/p")
    with pytest.raises(OfflineModeIsEnabled):
        list_priors()
    assert hub_server.requests == []


def test_repo_without_a_prior(hub_server: HubServer, api: HfApi) -> None:
    api.create_repo("org/model")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="weights.bin", repo_id="org/model")
    with pytest.raises(PriorNotFoundError, match=r"holds no prior there \(files present: \['.gitattributes'"):
        download_prior("org/model")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/model")
    with pytest.raises(PriorNotFoundError, match=r"Can't find 'prior.safetensors' or '.*index.json'.*no tensors"):
        download_prior("org/model")


def test_index_naming_a_missing_shard_or_malformed(hub_server: HubServer, api: HfApi) -> None:
    api.create_repo("org/broken")
    index = {"weight_map": {"w.mean": "prior-00001-of-00002.safetensors"}}
    ops = [
        CommitOperationAdd("config.json", b"{}"),
        CommitOperationAdd("prior.safetensors.index.json", json.dumps(index).encode()),
    ]
    api.create_commit("org/broken", ops, commit_message="broken")
    with pytest.raises(PriorNotFoundError, match=r"shard 'prior-00001-of-00002\.safetensors' listed"):
        download_prior("org/broken")
    api.upload_file(path_or_fileobj=b"[1, 2", path_in_repo="prior.safetensors.index.json", repo_id="org/broken")
    with pytest.raises(PriorFormatError, match="not a valid shard index"):
        download_prior("org/broken")


@pytest.mark.parametrize("bad", ["not a repo!", "a/b/c", "-leading-dash/x", "./missing-folder"])
def test_invalid_id(bad: str) -> None:
    with pytest.raises(PriorNotFoundError, match=f"{re.escape(repr(bad))}: it is neither an existing local folder"):
        download_prior(bad)


def test_hub_errors_fall_back_to_the_cache_or_explain(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    upload_prior(write_prior(tmp_path / "p"), "org/prior")
    cached = download_prior("org/prior")
    hub_server.outage = 403  # e.g. a proxy refusing; 5xx and refused connections behave the same, after retries
    assert download_prior("org/prior") == cached  # the cached snapshot, as huggingface_hub itself falls back to
    with pytest.raises(PriorNotFoundError, match=r"could not be reached and it is not in the cache.*403"):
        download_prior("org/other")


def test_upload_refuses_incomplete_folders(hub_server: HubServer, token_env: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PriorNotFoundError, match="not a prior folder"):
        upload_prior(tmp_path / "empty", "org/x")
    sharded = write_prior(tmp_path / "s", shards=2)
    (sharded / "prior-00002-of-00002.safetensors").unlink()
    with pytest.raises(PriorFormatError, match=r"\['prior-00002-of-00002.safetensors'\] listed"):
        upload_prior(sharded, "org/x")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    with pytest.raises(PriorNotFoundError, match=r"neither 'prior\.safetensors' nor"):
        upload_prior(tmp_path / "cfg", "org/x")
    with pytest.raises(ValueError, match="Repo id"):
        upload_prior(write_prior(tmp_path / "ok"), "bad id!")


# --------------------------------------------------------------------------------------------- discovery
def test_list_priors(hub_server: HubServer, token_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upload_prior(write_prior(tmp_path / "a"), "zoo/resnet-swag")
    upload_prior(write_prior(tmp_path / "b"), "zoo/vit-swag")
    upload_prior(write_prior(tmp_path / "c"), "me/private-swag", private=True)
    HfApi().create_repo("zoo/not-a-prior")
    assert sorted(m.id for m in list_priors()) == ["me/private-swag", "zoo/resnet-swag", "zoo/vit-swag"]
    assert [m.id for m in list_priors(search="vit")] == ["zoo/vit-swag"]
    assert sorted(m.id for m in list_priors(author="zoo")) == ["zoo/resnet-swag", "zoo/vit-swag"]
    assert len(list_priors(limit=1)) == 1
    (info,) = list_priors(search="resnet")
    assert info.library_name == "priorzoo"
    assert "bayesian-prior" in info.tags
    monkeypatch.delenv("HF_TOKEN")
    assert sorted(m.id for m in list_priors()) == ["zoo/resnet-swag", "zoo/vit-swag"]  # private hidden


# --------------------------------------------------------------------------------------------- PriorModel
@pytest.mark.parametrize("max_shard_size", ["2GB", 400], ids=["single-file", "sharded"])
def test_prior_model_push_then_from_pretrained_by_id(
    hub_server: HubServer, token_env: str, monkeypatch: pytest.MonkeyPatch, max_shard_size: int | str
) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"conv.weight": (4, 3, 2), "conv.bias": (4,), "fc.weight": (2, 6)}
    mean = {n: torch.randn(*s, generator=g) for n, s in shapes.items()}
    variance = {n: torch.rand(*s, generator=g) + 0.1 for n, s in shapes.items()}
    factor = {n: 0.1 * torch.randn(3, *s, generator=g) for n, s in shapes.items()}
    prior = PriorModel.from_tensors(mean, variance, factor, scale=2.0)
    point = {n: torch.randn(*s, generator=g) for n, s in shapes.items()}

    info = prior.push_to_hub("org/model-prior", subfolder="swag", max_shard_size=max_shard_size)
    assert isinstance(info, CommitInfo)
    commit = info.oid
    prior.push_to_hub("org/model-prior", subfolder="swag", max_shard_size=max_shard_size, revision="other")
    sharded = any("-of-" in f for f in hub_server.files("org/model-prior"))
    assert sharded == (max_shard_size != "2GB")

    loaded = PriorModel.from_pretrained("org/model-prior", subfolder="swag", revision=commit)
    for n in shapes:
        assert torch.equal(loaded.mean[n], prior.mean[n])
        assert torch.equal(loaded.variance[n], prior.variance[n])
        assert torch.equal(loaded.cov_factor[n], prior.cov_factor[n])
    assert loaded.config.scale == 2.0
    assert torch.equal(loaded.log_prob(point), prior.log_prob(point))

    set_hf_offline(monkeypatch)
    offline = PriorModel.from_pretrained("org/model-prior", subfolder="swag", revision=commit)
    assert torch.equal(offline.log_prob(point), prior.log_prob(point))


def test_prior_model_repush_makes_no_commit(hub_server: HubServer, token_env: str) -> None:
    prior = PriorModel.from_tensors({"w": torch.zeros(4)}, {"w": torch.ones(4)}, {"w": torch.ones(2, 4)})
    commits = {prior.push_to_hub("org/again").oid for _ in range(4)}
    assert len(commits) == 1
    assert hub_server.commit_count("org/again") == 2


def test_pushed_card_names_the_repo(hub_server: HubServer, token_env: str) -> None:
    prior = PriorModel.from_tensors({"w": torch.zeros(4)}, variance=1.0)
    prior.push_to_hub("org/carded")
    from huggingface_hub import hf_hub_download

    card = Path(hf_hub_download("org/carded", "README.md")).read_text()
    assert 'PriorModel.from_pretrained("org/carded")' in card
