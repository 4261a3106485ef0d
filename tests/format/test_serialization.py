"""Saving and loading prior folders: whole-prior replacement, refused targets, ranges, modes, shard names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _models import rewrite_tensors
from safetensors.torch import load_file, save_file

from priorzoo import PriorModel
from priorzoo.errors import MixedPriorError, PriorFormatError, PriorNotFoundError
from priorzoo.format.files import CONFIG_NAME, INDEX_NAME, LOCK_NAME, TMP_RE, WEIGHTS_NAME, prior_files


def prior(value: float, *, scale: float = 1.0, rank: int = 2, n: int = 3) -> PriorModel:
    """A small SWAG prior whose mean is ``value`` everywhere and whose config says ``scale``."""
    names = [f"layer{i}.weight" for i in range(n)]
    return PriorModel.from_tensors(
        {k: torch.full((4, 3), value) for k in names},
        {k: torch.full((4, 3), 0.5) for k in names},
        {k: torch.full((rank, 4, 3), 0.1) for k in names},
        scale=scale,
    )


def state(folder: Path) -> tuple[float, float]:
    """(λ from the config, the mean from the tensors): a mixed folder gives a pair no save wrote."""
    p = PriorModel.from_pretrained(folder)
    return p.scale, float(p.mean["layer0.weight"][0, 0])


OLD, NEW = (2.0, 1.0), (5.0, 3.0)


def save_old_then_new(folder: Path, *, old_shards: bool, new_shards: bool) -> None:
    prior(OLD[1], scale=OLD[0]).save_pretrained(folder, max_shard_size=200 if old_shards else "2GB")
    prior(NEW[1], scale=NEW[0]).save_pretrained(folder, max_shard_size=200 if new_shards else "2GB")


# --------------------------------------------------------------------------------------------- atomic replace
def load_or_mixed(folder: Path) -> tuple[float, float] | str:
    """The state of a folder, or ``"mixed"`` when the loader refuses it as files of two saves."""
    try:
        return state(folder)
    except MixedPriorError:
        return "mixed"


@pytest.mark.parametrize(("old_shards", "new_shards"), [(False, False), (False, True), (True, False), (True, True)])
def test_a_failing_rename_at_any_step_never_gives_a_mixed_prior(tmp_path, monkeypatch, old_shards, new_shards):
    # os.replace raises at its k-th call, for every k the save makes: the folder reads as the old prior, the
    # new one, or is refused as files of two saves (tensors renamed, config.json not yet) — never a mixture
    real_replace = os.replace
    old_size, new_size = (200 if old_shards else "2GB"), (200 if new_shards else "2GB")
    calls = []
    prior(OLD[1], scale=OLD[0]).save_pretrained(tmp_path / "count", max_shard_size=old_size)
    monkeypatch.setattr(os, "replace", lambda src, dst, **kw: calls.append(dst) or real_replace(src, dst, **kw))
    prior(NEW[1], scale=NEW[0]).save_pretrained(tmp_path / "count", max_shard_size=new_size)
    assert calls[-1] == CONFIG_NAME and len(calls) >= 3  # tensors and card first, config.json last
    seen = set()
    for fail_at in range(1, len(calls) + 1):
        folder = tmp_path / f"p{fail_at}"
        monkeypatch.setattr(os, "replace", real_replace)
        prior(OLD[1], scale=OLD[0]).save_pretrained(folder, max_shard_size=old_size)
        count = iter(range(1, 100))

        def flaky(src, dst, count=count, fail_at=fail_at, **kw):
            if next(count) == fail_at:
                raise OSError(f"simulated crash at rename {fail_at}")
            return real_replace(src, dst, **kw)

        monkeypatch.setattr(os, "replace", flaky)
        with pytest.raises(OSError, match="simulated crash"):
            prior(NEW[1], scale=NEW[0]).save_pretrained(folder, max_shard_size=new_size)
        monkeypatch.setattr(os, "replace", real_replace)
        got = load_or_mixed(folder)
        assert got in (OLD, NEW, "mixed"), f"failing rename {fail_at}: mixed prior {got}"
        seen.add(got)
        assert not [p for p in folder.iterdir() if p.name.startswith(".priorzoo-")]  # temporaries discarded
        prior(7.0, scale=9.0).save_pretrained(folder, max_shard_size=old_size)  # the next save repairs it
        assert state(folder) == (9.0, 7.0)
        names = {p.name for p in folder.iterdir()}
        assert (INDEX_NAME in names) == old_shards and (WEIGHTS_NAME in names) != old_shards
    assert NEW not in seen  # config.json is renamed last: the commit point


def test_a_save_interrupted_after_its_commit_reads_as_the_new_prior(tmp_path, monkeypatch):
    # killed after config.json was renamed, before the old layout's file was removed: both layouts are there,
    # and the one whose files carry config.json's save id is the prior
    folder = tmp_path / "p"
    prior(OLD[1], scale=OLD[0]).save_pretrained(folder)
    real_unlink = os.unlink

    def interrupt(path, *args, **kwargs):
        if path == WEIGHTS_NAME:
            raise KeyboardInterrupt  # Ctrl-C while removing the old prior's file
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prior(NEW[1], scale=NEW[0]).save_pretrained(folder, max_shard_size=200)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert (folder / WEIGHTS_NAME).is_file() and (folder / INDEX_NAME).is_file()
    assert state(folder) == NEW
    assert WEIGHTS_NAME not in prior_files(folder)
    prior(NEW[1], scale=NEW[0]).save_pretrained(folder, max_shard_size=200)
    assert not (folder / WEIGHTS_NAME).exists()


def test_a_failure_before_the_commit_keeps_the_old_prior_and_cleans_up(tmp_path, monkeypatch):
    folder = tmp_path / "p"
    prior(OLD[1], scale=OLD[0]).save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("priorzoo.format.commit.write_tensor_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prior(NEW[1], scale=NEW[0]).save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_temporaries_are_files_of_the_fixed_pattern_inside_the_target(tmp_path, monkeypatch):
    from priorzoo.format import commit

    seen = []
    real = commit._commit

    def spy(dir_fd, staging, was_prior, where):
        seen.extend((p.name, p.is_file()) for p in (tmp_path / "new").iterdir())
        return real(dir_fd, staging, was_prior, where)

    monkeypatch.setattr(commit, "_commit", spy)
    prior(OLD[1]).save_pretrained(tmp_path / "new", max_shard_size=200)  # a new folder too
    temporaries = [(n, f) for n, f in seen if n.startswith(".priorzoo-tmp-")]
    assert temporaries and all(TMP_RE.fullmatch(n) and is_file for n, is_file in temporaries)
    assert {n for n, _ in seen} - {n for n, _ in temporaries} == {LOCK_NAME}
    assert sorted(tmp_path.iterdir()) == [tmp_path / "new"]


def test_leftovers_of_interrupted_saves_are_removed_inside_the_target_only(tmp_path):
    folder = prior(OLD[1], scale=OLD[0]).save_pretrained(tmp_path / "p")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    token = "0123456789abcdef"
    (folder / f".priorzoo-tmp-{token}-prior.safetensors").write_bytes(b"half a file")
    (folder / f".priorzoo-tmp-{token}-config.json").symlink_to(outside)  # a link: removed, its target kept
    junk_dir = folder / f".priorzoo-tmp-{token}-README.md"
    junk_dir.mkdir()  # a directory named like a leftover: never entered, left alone
    (junk_dir / "inside").write_text("x")
    other = folder / ".priorzoo-tmp-notmine"
    other.write_text("not of the pattern")
    assert state(folder) == OLD
    prior(NEW[1], scale=NEW[0]).save_pretrained(folder)
    assert state(folder) == NEW
    assert outside.read_text() == "keep me"
    assert not os.path.lexists(folder / f".priorzoo-tmp-{token}-config.json")
    assert not (folder / f".priorzoo-tmp-{token}-prior.safetensors").exists()
    assert (junk_dir / "inside").read_text() == "x" and other.read_text() == "not of the pattern"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = prior(OLD[1]).save_pretrained(tmp_path / "p", max_shard_size=200)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


# --------------------------------------------------------------------------------------------- refused targets
def transformers_folder(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    (folder / CONFIG_NAME).write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (folder / "README.md").write_text("# my model\n")
    (folder / "prior-00001-of-00002.safetensors").write_bytes(b"not mine")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_save_refuses_a_folder_holding_another_library_s_config(tmp_path):
    before = transformers_folder(tmp_path / "bert")
    with pytest.raises(FileExistsError, match=r"`save_directory` .*bert.* holds a config\.json that is not a priorzoo"):
        prior(OLD[1]).save_pretrained(tmp_path / "bert")
    assert {p.name: p.read_bytes() for p in (tmp_path / "bert").iterdir()} == before


def test_save_refuses_an_empty_path_and_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"`save_directory` is empty"):
        prior(OLD[1]).save_pretrained("")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        prior(OLD[1]).save_pretrained(tmp_path / "file")


# --------------------------------------------------------------------------------------------- half precision
def test_float16_overflow_is_refused_before_anything_is_written(tmp_path):
    folder = prior(OLD[1], scale=OLD[0]).save_pretrained(tmp_path / "p")
    big = prior(NEW[1])
    big.cov_factor["layer1.weight"][0, 0, 0] = 1e6
    with pytest.raises(PriorFormatError, match=r"`layer1\.weight\.cov_factor` holds values up to 1e\+06.*bfloat16"):
        big.save_pretrained(folder, factor_dtype="float16")
    with pytest.raises(PriorFormatError, match=r"`layer1\.weight\.cov_factor`"):
        big.save_pretrained(folder, dtype=torch.float16)
    assert state(folder) == OLD  # the good prior is still there
    big.save_pretrained(folder, factor_dtype="bfloat16")  # the suggested fix works
    assert PriorModel.from_pretrained(folder).cov_factor["layer1.weight"].dtype == torch.bfloat16


def test_variances_flushed_to_zero_by_float16_are_refused(tmp_path):
    tiny = prior(1.0)
    tiny.variance["layer2.weight"][1, 1] = 1e-9
    with pytest.raises(PriorFormatError, match=r"`layer2\.weight\.variance` has 1 positive value.*1e-09.*float32"):
        tiny.save_pretrained(tmp_path / "p", dtype="float16")
    assert not (tmp_path / "p" / CONFIG_NAME).exists()


# --------------------------------------------------------------------------------------------- shard names
@pytest.mark.parametrize("shard", ["../outside/prior-00001-of-00001.safetensors", "/etc/passwd", "x.safetensors"])
def test_a_local_index_naming_a_file_outside_the_prior_is_refused_unread(tmp_path, shard):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"secret_tensor_name.mean": torch.zeros(1)}, outside / "prior-00001-of-00001.safetensors")
    folder = prior(1.0).save_pretrained(tmp_path / "p", max_shard_size=200)
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"] = {k: shard for k in index["weight_map"]}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(PriorFormatError, match="names invalid shard files") as info:
        PriorModel.from_pretrained(folder)
    assert "secret_tensor_name" not in str(info.value)


@pytest.mark.parametrize("sub", ["../other", "/etc", "a/../../other"])
def test_subfolder_must_stay_inside_the_folder(tmp_path, sub):
    prior(1.0).save_pretrained(tmp_path / "other")
    (tmp_path / "zoo").mkdir()
    with pytest.raises(ValueError, match="`subfolder` must be a relative path inside"):
        PriorModel.from_pretrained(tmp_path / "zoo", subfolder=sub)


def test_a_subfolder_link_leading_outside_is_refused(tmp_path):
    prior(1.0).save_pretrained(tmp_path / "other")
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "p").symlink_to(tmp_path / "other")
    with pytest.raises(ValueError, match="leads outside"):
        PriorModel.from_pretrained(tmp_path / "zoo", subfolder="p")


def test_a_cache_snapshot_with_links_into_blobs_loads(tmp_path):
    src = prior(1.0).save_pretrained(tmp_path / "src")
    blobs = tmp_path / "repo" / "blobs"
    snap = tmp_path / "repo" / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        (blobs / f"blob{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert state(snap) == (1.0, 1.0)
    with pytest.raises(PriorFormatError, match="outside the prior folder: refusing to upload"):
        prior_files(snap, upload=True)


# --------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize(("suffix", "dtype"), [("cov_factor", torch.int8), ("mean", torch.float8_e4m3fn)])
def test_a_tensor_of_a_dtype_outside_the_format_is_refused(tmp_path, suffix, dtype):
    folder = prior(1.0).save_pretrained(tmp_path / "p")
    tensors = load_file(folder / WEIGHTS_NAME)
    tensors[f"layer0.weight.{suffix}"] = tensors[f"layer0.weight.{suffix}"].to(dtype)
    rewrite_tensors(folder / WEIGHTS_NAME, tensors)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(PriorFormatError, match=rf"`layer0\.weight\.{suffix}` has dtype {name}; .*'bfloat16'"):
        PriorModel.from_pretrained(folder)


def test_not_a_prior_messages(tmp_path):
    with pytest.raises(PriorNotFoundError, match="`pretrained` is empty"):
        PriorModel.from_pretrained("")
