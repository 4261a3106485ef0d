"""The local Hub server speaks the protocol huggingface_hub's real client expects (no mocking)."""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import huggingface_hub
import pytest
from hub_server import HubServer, patch_hf_env, set_hf_offline
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

CARD = "---\nlibrary_name: priorzoo\ntags:\n- priorzoo\n- bayesian-prior\nlicense: apache-2.0\n---\n# A prior\n"


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def api(hub_server: HubServer) -> HfApi:
    return HfApi(token=hub_server.token)  # endpoint comes from the patched constants, as for users


@pytest.fixture
def repo(api: HfApi, hub_server: HubServer, tmp_path: Path) -> str:
    """``org/prior`` holding a README card, a config and a nested binary file."""
    api.create_repo("org/prior")
    folder = _folder(
        tmp_path / "upload",
        {
            "README.md": CARD.encode(),
            "config.json": b'{"rank": 2}',
            "sub/prior.safetensors": bytes(range(256)) * 9,
        },
    )
    api.upload_folder(repo_id="org/prior", folder_path=folder, commit_message="add prior")
    return "org/prior"


def test_create_repo_exist_ok_and_conflict(api: HfApi, hub_server: HubServer) -> None:
    url = api.create_repo("org/new")
    assert url.repo_id == "org/new"
    assert url.startswith(hub_server.url)
    assert hub_server.commit_count("org/new") == 1  # the Hub's initial .gitattributes commit
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("org/new")
    assert err.value.response.status_code == 409
    assert api.create_repo("org/new", exist_ok=True).repo_id == "org/new"
    assert api.list_repo_files("org/new") == [".gitattributes"]


def test_module_level_helpers_use_the_local_endpoint(hub_server: HubServer, repo: str) -> None:
    # huggingface_hub.model_info is bound to an HfApi created at import time: the fixture re-points it
    assert huggingface_hub.model_info(repo).id == repo
    assert hub_server.url == huggingface_hub.constants.ENDPOINT


def test_upload_folder_then_download_identical_bytes(
    api: HfApi, hub_server: HubServer, repo: str, tmp_path: Path
) -> None:
    assert hub_server.commit_count(repo) == 2
    info = api.model_info(repo, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {
        ".gitattributes": 50,
        "README.md": len(CARD),
        "config.json": 11,
        "sub/prior.safetensors": 2304,
    }
    assert info.library_name == "priorzoo"
    assert "bayesian-prior" in info.tags
    assert "license:apache-2.0" in info.tags

    path = Path(hf_hub_download(repo, "prior.safetensors", subfolder="sub"))
    assert path.read_bytes() == bytes(range(256)) * 9
    assert path.parent.parent.name == info.sha  # cache layout: snapshots/<commit>/sub/prior.safetensors

    snapshot = Path(snapshot_download(repo, allow_patterns=["sub/*", "config.json"]))
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == [
        "config.json",
        "sub/prior.safetensors",
    ]
    assert (snapshot / "config.json").read_bytes() == b'{"rank": 2}'

    # a cached file pinned by commit sha is served from disk without any request
    before = len(hub_server.requests)
    hf_hub_download(repo, "config.json", revision=info.sha)
    assert len(hub_server.requests) == before


def test_tree_paths_info_and_commits(api: HfApi, repo: str) -> None:
    tree = {e.path: e for e in api.list_repo_tree(repo, recursive=True)}
    assert set(tree) == {".gitattributes", "README.md", "config.json", "sub", "sub/prior.safetensors"}
    data = b'{"rank": 2}'
    assert tree["config.json"].blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert [e.path for e in api.list_repo_tree(repo, path_in_repo="sub")] == ["sub/prior.safetensors"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo, path_in_repo="missing"))
    infos = api.get_paths_info(repo, ["config.json", "sub", "nope"])
    assert [i.path for i in infos] == ["config.json", "sub"]
    assert [c.title for c in api.list_repo_commits(repo)] == ["add prior", "initial commit"]


def test_branches_and_pinned_revisions(api: HfApi, hub_server: HubServer, repo: str) -> None:
    main_sha = api.model_info(repo).sha
    api.create_branch(repo, branch="v2")
    api.create_branch(repo, branch="v2", exist_ok=True)
    commit = api.upload_file(path_or_fileobj=b'{"rank": 5}', path_in_repo="config.json", repo_id=repo, revision="v2")
    refs = api.list_repo_refs(repo)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main_sha, "v2": commit.oid}

    assert Path(hf_hub_download(repo, "config.json", revision="v2")).read_bytes() == b'{"rank": 5}'
    assert Path(hf_hub_download(repo, "config.json")).read_bytes() == b'{"rank": 2}'
    assert Path(hf_hub_download(repo, "config.json", revision=main_sha)).read_bytes() == b'{"rank": 2}'
    assert Path(snapshot_download(repo, revision=commit.oid)).joinpath("config.json").read_bytes() == b'{"rank": 5}'
    assert api.model_info(repo, revision=main_sha[:10]).sha == main_sha  # abbreviated sha

    api.create_tag(repo, tag="v1.0", revision=main_sha)
    assert Path(hf_hub_download(repo, "config.json", revision="v1.0")).read_bytes() == b'{"rank": 2}'
    assert hub_server.files(repo, "v2")["config.json"] == b'{"rank": 5}'


def test_create_commit_deletes_parent_commit_and_pull_requests(api: HfApi, repo: str) -> None:
    head = api.model_info(repo).sha
    ops = [
        CommitOperationAdd("sub/prior-00001-of-00002.safetensors", b"a"),
        CommitOperationDelete("sub/prior.safetensors"),
    ]
    new = api.create_commit(repo, ops, commit_message="shard", parent_commit=head)
    assert api.list_repo_files(repo) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "sub/prior-00001-of-00002.safetensors",
    ]
    with pytest.raises(HfHubHTTPError) as err:  # parent_commit is no longer the head
        api.create_commit(repo, [CommitOperationAdd("x", b"x")], commit_message="late", parent_commit=head)
    assert err.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo, [CommitOperationDelete("nope.txt")], commit_message="rm")

    pr = api.create_commit(repo, [CommitOperationAdd("pr.txt", b"pr")], commit_message="pr", create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert pr.pr_num == 1
    assert api.model_info(repo).sha == new.oid  # main untouched
    assert Path(hf_hub_download(repo, "pr.txt", revision="refs/pr/1")).read_bytes() == b"pr"
    assert [r.name for r in api.list_repo_refs(repo, include_pull_requests=True).pull_requests] == ["1"]


def test_unchanged_files_make_no_commit(api: HfApi, hub_server: HubServer, repo: str) -> None:
    # the preupload answer carries the remote oid, so the client drops unchanged additions itself
    api.upload_file(path_or_fileobj=b'{"rank": 2}', path_in_repo="config.json", repo_id=repo)
    assert hub_server.commit_count(repo) == 2


def test_private_repo_needs_its_owners_token(api: HfApi, hub_server: HubServer) -> None:
    api.create_repo("me/secret", private=True)
    api.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id="me/secret")
    assert api.model_info("me/secret").private is True
    anonymous, stranger = HfApi(token=False), HfApi(token=hub_server.add_user("stranger"))
    for client in (anonymous, stranger):
        with pytest.raises(RepositoryNotFoundError):
            client.model_info("me/secret")
        assert [m.id for m in client.list_models(author="me")] == []
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/secret", "s.txt")  # no token on this machine
    assert Path(hf_hub_download("me/secret", "s.txt", token=hub_server.token)).read_bytes() == b"s"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").model_info("me/secret")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError):
        anonymous.create_repo("me/other")  # writing needs a token


def test_token_from_the_environment_is_used(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    HfApi().create_repo("me/env", private=True)
    assert huggingface_hub.whoami()["name"] == hub_server.user
    assert HfApi().model_info("me/env").id == "me/env"


def test_not_found_errors_are_the_clients_own(api: HfApi, repo: str) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo, revision="nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.json")


def test_list_models_filters(api: HfApi, repo: str) -> None:
    api.create_repo("other/plain")
    assert [m.id for m in api.list_models(filter="priorzoo")] == [repo]
    assert [m.id for m in api.list_models(filter=["priorzoo", "bayesian-prior"])] == [repo]
    assert [m.id for m in api.list_models(search="PLAIN")] == ["other/plain"]
    assert [m.id for m in api.list_models(author="org")] == [repo]
    assert len(list(api.list_models(limit=1))) == 1
    (info,) = api.list_models(filter="priorzoo", full=True, cardData=True)
    assert info.library_name == "priorzoo"
    assert info.card_data.license == "apache-2.0"
    assert info.sha


def test_offline_mode_serves_the_cache_without_requests(
    hub_server: HubServer, repo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = Path(snapshot_download(repo))
    set_hf_offline(monkeypatch)
    before = len(hub_server.requests)
    assert Path(hf_hub_download(repo, "config.json")) == online / "config.json"
    assert Path(snapshot_download(repo)) == online
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("org/never-downloaded", "config.json")
    assert len(hub_server.requests) == before


# huggingface_hub's own LFS upload passes a file object as `data=`, which httpx2 deprecates
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_lfs_uploads_and_range_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = bytes(range(200)) * 50
    with HubServer(lfs_suffixes=(".safetensors",)) as server:
        patch_hf_env(monkeypatch, server.url, tmp_path / "home")
        api = HfApi(token=server.token)
        api.create_repo("org/lfs")
        api.upload_folder(repo_id="org/lfs", folder_path=_folder(tmp_path / "f", {"w.safetensors": payload}))
        (entry,) = [e for e in api.list_repo_tree("org/lfs") if e.path == "w.safetensors"]
        assert entry.lfs is not None
        assert entry.lfs.sha256 == hashlib.sha256(payload).hexdigest()
        assert Path(hf_hub_download("org/lfs", "w.safetensors")).read_bytes() == payload
        assert any(path.endswith("/info/lfs/objects/batch") for _, path in server.requests)

        url = huggingface_hub.hf_hub_url("org/lfs", "w.safetensors")
        r = huggingface_hub.get_session().get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206
        assert r.content == payload[10:20]
        assert r.headers["X-Linked-Etag"] == f'"{entry.lfs.sha256}"'


def test_close_joins_threads_and_frees_the_port() -> None:
    server = HubServer().start()
    port = int(server.url.rsplit(":", 1)[1])
    assert HfApi(endpoint=server.url, token=server.token).create_repo("a/b").repo_id == "a/b"
    server.close()
    assert not any(t.name == "hub-server" for t in threading.enumerate())
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))


def test_a_server_side_push_between_a_clients_requests(api: HfApi, hub_server: HubServer, repo: str) -> None:
    first = api.model_info(repo).sha
    seen: list[tuple[str, str]] = []

    def hook(method: str, path: str) -> None:
        seen.append((method, path))
        if method == "GET" and "/resolve/" in path and len(seen) == 2:
            hub_server.push(repo, {"config.json": b'{"rank": 3}'}, delete=("sub/prior.safetensors",))

    hub_server.on_request = hook
    # hf_hub_download alone: HEAD `main` names the first commit, the push lands, GET `main` serves the second's file
    path = Path(hf_hub_download(repo, "config.json"))
    assert seen == [("HEAD", f"/{repo}/resolve/main/config.json"), ("GET", f"/{repo}/resolve/main/config.json")]
    assert path.parent.name == first and path.read_bytes() == b'{"rank": 3}'
    second = api.model_info(repo).sha
    assert second != first and hub_server.files(repo) == {
        ".gitattributes": hub_server.files(repo, first)[".gitattributes"],
        "README.md": CARD.encode(),
        "config.json": b'{"rank": 3}',
    }
    assert hub_server.files(repo, first)["config.json"] == b'{"rank": 2}'  # a commit is immutable


def test_dripping_bodies(api: HfApi, hub_server: HubServer, repo: str) -> None:
    hub_server.drip = 0.01
    assert Path(hf_hub_download(repo, "config.json")).read_bytes() == b'{"rank": 2}'  # slowly, but whole
