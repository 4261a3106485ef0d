"""A prior folder is untrusted input: it never makes priorzoo write, read or delete outside itself, every reader
reads its visible files through one validated path, and no reader ever gets a mixture of two saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _models import rewrite_tensors
from safetensors.torch import load_file

from priorzoo import PriorModel
from priorzoo.binding.sharded import open_prior
from priorzoo.errors import MixedPriorError, PriorFormatError, PriorMatchError, PriorNotFoundError
from priorzoo.format.files import CARD_NAME, CONFIG_NAME, INDEX_NAME, LOCK_NAME, SAVE_ID_KEY, WEIGHTS_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]


def prior(value: float, *, scale: float = 1.0, kind: str | None = None) -> PriorModel:
    names = [f"layer{i}.weight" for i in range(3)]
    if kind == "isotropic":
        return PriorModel.from_tensors({n: torch.full((4, 3), value) for n in names}, variance=0.5, scale=scale)
    return PriorModel.from_tensors(
        {n: torch.full((4, 3), value) for n in names},
        {n: torch.full((4, 3), 0.5) for n in names},
        {n: torch.full((2, 4, 3), 0.1) for n in names},
        scale=scale,
    )


def state(folder: Path) -> tuple[str, float, float]:
    p = PriorModel.from_pretrained(folder)
    means = {float(t.flatten()[0]) for t in p.mean.values()}
    assert len(means) == 1, f"tensors of two saves mixed: {means}"
    return p.kind.value, p.scale, means.pop()


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` (links as their target), to prove nothing outside a folder changed."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = path.read_bytes()
    return out


# --------------------------------------------------------------------------------------------- planted side folders
def plant_manifest(folder: Path, names: list[str]) -> None:
    """The old staging mechanism's side folder, as a hostile folder would ship it."""
    side = folder / ".priorzoo-commit"
    side.mkdir()
    (side / "manifest.json").write_text(json.dumps({"files": names}))
    for name in names:
        if "/" not in name:
            (side / name).write_text("planted")
    hidden = prior(9.0, scale=1e6, kind="isotropic").save_pretrained(folder.parent / "hidden")
    for f in hidden.iterdir():
        if f.is_file():
            (side / f.name).write_bytes(f.read_bytes())


@pytest.mark.parametrize("planted", ["../victim.txt", "ABSOLUTE", "link"])
def test_a_planted_side_folder_changes_nothing_outside_and_the_visible_prior_loads(tmp_path, planted):
    home = tmp_path / "home"
    home.mkdir()
    victim = home / "victim.txt"
    victim.write_text("keep")
    folder = prior(1.0, scale=2.0).save_pretrained(home / "prior")
    if planted == "link":
        outside = home / "outside"
        outside.mkdir()
        (outside / "manifest.json").write_text(json.dumps({"files": ["victim.txt", CONFIG_NAME]}))
        (outside / "victim.txt").write_text("planted")
        (folder / ".priorzoo-commit").symlink_to(outside)
    else:
        plant_manifest(folder, [str(victim) if planted == "ABSOLUTE" else planted, ".bashrc", CONFIG_NAME])
    before_outside = {k: v for k, v in tree(home).items() if not k.startswith("prior/")}
    assert state(folder) == ("swag", 2.0, 1.0)  # the visible prior, not the planted one
    assert state(open_prior_folder_path(folder)) == ("swag", 2.0, 1.0)
    prior(3.0, scale=5.0).save_pretrained(folder)
    assert state(folder) == ("swag", 5.0, 3.0)
    assert {k: v for k, v in tree(home).items() if not k.startswith("prior/")} == before_outside
    assert victim.read_text() == "keep"
    assert (folder / ".priorzoo-commit").exists() or (folder / ".priorzoo-commit").is_symlink()  # never touched


def open_prior_folder_path(folder: Path) -> Path:
    lazy = open_prior(folder)  # the sharded reader sees the same prior
    assert (lazy.kind.value, lazy.scale) == ("swag", PriorModel.from_pretrained(folder).scale)
    return folder


def test_a_link_planted_at_the_lock_or_a_final_name_is_refused_and_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    folder = prior(1.0).save_pretrained(tmp_path / "p")
    (folder / LOCK_NAME).symlink_to(outside)
    with pytest.raises(FileExistsError, match=r"lock file `\.priorzoo-lock`.*link"):
        prior(2.0).save_pretrained(folder)
    (folder / LOCK_NAME).unlink()
    (folder / CARD_NAME).unlink()
    (folder / CARD_NAME).symlink_to(outside)  # replaced as a link (the link itself), never written through
    prior(2.0).save_pretrained(folder)
    assert outside.read_text() == "keep" and not (folder / CARD_NAME).is_symlink()
    (folder / WEIGHTS_NAME).unlink()
    (folder / WEIGHTS_NAME).mkdir()
    with pytest.raises(FileExistsError, match=r"`prior\.safetensors` is a directory"):
        prior(3.0).save_pretrained(folder)


# --------------------------------------------------------------------------------------------- non-prior targets
def test_a_non_prior_folder_is_never_written_into_without_overwrite(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / CARD_NAME).write_text("# my project\n")
    (project / "prior-00001-of-00002.safetensors").write_bytes(b"mine")
    (project / "setup.py").write_text("")
    before = tree(project)
    with pytest.raises(FileExistsError, match=r"non-empty folder that holds no prior .*'README\.md'.*overwrite=True"):
        prior(1.0).save_pretrained(project)
    monkeypatch.chdir(project)
    with pytest.raises(FileExistsError, match="non-empty folder that holds no prior"):
        prior(1.0).save_pretrained(".")
    assert tree(project) == before
    # explicitly allowed: the prior is written, nothing of the folder's own is deleted
    prior(1.0).save_pretrained(project, overwrite=True)
    assert state(project) == ("swag", 1.0, 1.0)
    assert (project / "prior-00001-of-00002.safetensors").read_bytes() == b"mine"
    assert (project / "setup.py").exists()


def test_an_empty_folder_and_one_with_only_leftovers_are_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    prior(1.0).save_pretrained(tmp_path / "empty")
    (tmp_path / "left").mkdir()
    (tmp_path / "left" / LOCK_NAME).write_text("")
    (tmp_path / "left" / ".priorzoo-tmp-0123456789abcdef-config.json").write_text("{}")
    prior(1.0).save_pretrained(tmp_path / "left")
    assert sorted(p.name for p in (tmp_path / "left").iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]


# --------------------------------------------------------------------------------------------- the save id
def test_identical_saves_are_byte_identical_and_carry_one_save_id(tmp_path):
    for size in ("2GB", 200):
        a = prior(1.0).save_pretrained(tmp_path / f"a{size}", max_shard_size=size)
        b = prior(1.0).save_pretrained(tmp_path / f"b{size}", max_shard_size=size)
        first = tree(a)
        prior(1.0).save_pretrained(a, max_shard_size=size)  # again into the same folder
        assert tree(a) == first == tree(b)
        save_id = json.loads((a / CONFIG_NAME).read_text())["save_id"]
        from safetensors import safe_open

        tensor_files = [p for p in a.iterdir() if p.name.endswith(".safetensors")]
        for f in tensor_files:
            with safe_open(str(f), framework="pt") as st:
                assert st.metadata()[SAVE_ID_KEY] == save_id
    other = prior(1.0, scale=3.0).save_pretrained(tmp_path / "c")
    assert json.loads((other / CONFIG_NAME).read_text())["save_id"] != save_id


def test_a_folder_written_before_save_ids_still_loads(tmp_path):
    folder = prior(1.0, scale=2.0).save_pretrained(tmp_path / "p")
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["save_id"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    tensors = load_file(folder / WEIGHTS_NAME)
    from safetensors.torch import save_file

    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    assert state(folder) == ("swag", 2.0, 1.0)


def test_tensors_of_another_save_under_the_config_are_refused_naming_both_ids(tmp_path):
    # what a kill -9 between the tensor renames and the config rename leaves
    folder = prior(1.0, scale=2.0).save_pretrained(tmp_path / "p")
    other = prior(3.0, scale=5.0).save_pretrained(tmp_path / "q")
    (folder / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())
    ids = [json.loads((f / CONFIG_NAME).read_text())["save_id"] for f in (folder, other)]
    for read in (PriorModel.from_pretrained, open_prior):
        with pytest.raises(MixedPriorError, match=rf"names save id {ids[0]}.*`prior\.safetensors`: {ids[1]}.*again"):
            read(folder)
    prior(1.0, scale=2.0).save_pretrained(folder)  # the remedy
    assert state(folder) == ("swag", 2.0, 1.0)


@pytest.mark.parametrize(("old_size", "new_size"), [("2GB", "2GB"), ("2GB", 200), (200, "2GB"), (200, 300)])
def test_a_save_landing_between_the_config_and_the_tensor_reads_gives_one_whole_prior(
    tmp_path, monkeypatch, old_size, new_size
):
    from priorzoo.format import serialization

    folder = prior(1.0, scale=2.0).save_pretrained(tmp_path / "p", max_shard_size=old_size)
    real = serialization.read_json
    landed = []

    def read_then_save(path, **kwargs):
        out = real(path, **kwargs)
        if Path(path).name == CONFIG_NAME and not landed:
            landed.append(True)  # the reader has the old config; the new save lands now
            prior(3.0, scale=5.0, kind="isotropic").save_pretrained(folder, max_shard_size=new_size)
        return out

    monkeypatch.setattr(serialization, "read_json", read_then_save)
    got = state(folder)
    assert landed and got == ("isotropic", 5.0, 3.0)  # re-read as a whole: config.json changed meanwhile
    landed.clear()
    lazy = open_prior(folder)
    assert landed and (lazy.kind.value, lazy.scale) == ("isotropic", 5.0)


def test_a_reader_never_returns_a_mixture_when_only_the_tensors_moved(tmp_path, monkeypatch):
    # the tensors of a save land, its config.json not yet (the writer still holds the lock): re-read, then
    # refused as mixed when the save never finishes (here: bounded by RETRY_S)
    from priorzoo.format import serialization

    folder = prior(1.0, scale=2.0).save_pretrained(tmp_path / "p")
    other = prior(3.0, scale=5.0).save_pretrained(tmp_path / "q")
    monkeypatch.setattr(serialization, "RETRY_S", 0.3)
    monkeypatch.setattr(serialization, "save_in_progress", lambda folder: True)
    (folder / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())
    with pytest.raises(MixedPriorError):
        PriorModel.from_pretrained(folder)


# --------------------------------------------------------------------------------------------- concurrent writers
_WRITER = textwrap.dedent(
    """
    import sys, torch
    from priorzoo import PriorModel

    folder, value, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    names = [f"layer{i}.weight" for i in range(3)]
    for i in range(n):
        p = PriorModel.from_tensors({k: torch.full((64, 64), value) for k in names}, variance=0.5, scale=value)
        p.save_pretrained(folder, max_shard_size=40_000 if i % 2 else "2GB")
    print("done", flush=True)
    """
)


def test_two_processes_saving_into_one_folder_are_serialised(tmp_path):
    folder = tmp_path / "p"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(folder), str(v), "15"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in (1.0, 2.0)
    ]
    results = [w.communicate(timeout=300) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], [r[1][-2000:] for r in results]
    p = PriorModel.from_pretrained(folder)
    assert {float(t.flatten()[0]) for t in p.mean.values()} == {p.scale}
    assert not [f for f in folder.iterdir() if f.name.startswith(".priorzoo-")]


def test_a_second_writer_waits_then_fails_naming_the_folder(tmp_path, monkeypatch):
    from priorzoo.format import commit

    folder = prior(1.0).save_pretrained(tmp_path / "p")
    monkeypatch.setattr(commit, "LOCK_TIMEOUT_S", 0.2)
    fd = os.open(folder, os.O_RDONLY)
    try:
        with commit.target_lock(fd, "held"):
            assert commit.save_in_progress(folder)
            with pytest.raises(TimeoutError, match=r"another process is saving a prior into .*'.*p'"):
                prior(2.0).save_pretrained(folder)
    finally:
        os.close(fd)
    assert not commit.save_in_progress(folder)
    assert state(folder) == ("swag", 1.0, 1.0)


# --------------------------------------------------------------------------------------------- one reader
def _shard_name(folder: Path, name: str) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"] = {k: name for k in index["weight_map"]}
    (folder / INDEX_NAME).write_text(json.dumps(index))


def _replace_weights(folder: Path, by) -> None:
    (folder / WEIGHTS_NAME).unlink()
    by(folder / WEIGHTS_NAME)


def _tensor(key: str, value):
    def edit(folder: Path, tmp: Path) -> None:
        tensors = load_file(folder / WEIGHTS_NAME)
        tensors[key] = value(tensors[key]) if callable(value) else value
        if tensors[key] is None:
            del tensors[key]
        rewrite_tensors(folder / WEIGHTS_NAME, tensors)

    return edit


def _outside(tmp: Path) -> Path:
    target = tmp / "outside.safetensors"
    target.write_bytes((tmp / "src" / WEIGHTS_NAME).read_bytes())
    return target


CASES = {
    "index naming ../x": (True, lambda f, t: _shard_name(f, "../outside/prior-00001-of-00001.safetensors"), "invalid"),
    "index naming /abs": (True, lambda f, t: _shard_name(f, "/etc/passwd"), "invalid shard"),
    "FIFO tensors": (False, lambda f, t: _replace_weights(f, os.mkfifo), "a FIFO, not a regular file"),
    "link out": (False, lambda f, t: _replace_weights(f, lambda p: p.symlink_to(_outside(t))), "outside the prior"),
    "directory": (False, lambda f, t: _replace_weights(f, os.mkdir), "a directory"),
    "NaN mean": (False, _tensor("layer0.weight.mean", lambda x: x * float("nan")), "non-finite"),
    "negative variance": (False, _tensor("layer1.weight.variance", lambda x: -x), "≥ 0"),
    "mean shape": (False, _tensor("layer0.weight.mean", torch.zeros(5)), r"has shape \(5,\)"),
    "float8 mean": (False, _tensor("layer0.weight.mean", lambda x: x.to(torch.float8_e4m3fn)), "dtype float8"),
    "int8 factor": (False, _tensor("layer2.weight.cov_factor", lambda x: x.to(torch.int8)), "dtype int8"),
    "missing tensor": (False, _tensor("layer2.weight.variance", lambda x: None), "missing tensor"),
    "foreign tensor": (False, _tensor("extra.mean", torch.zeros(1)), "not described"),
    "bool buffer": (False, _tensor("bn.running_mean.buffer", lambda x: x > 0), "dtype bool"),
    "inf buffer": (False, _tensor("bn.running_var.buffer", lambda x: x / 0), "non-finite"),
    "config FIFO": (False, lambda f, t: (f / CONFIG_NAME).unlink() or os.mkfifo(f / CONFIG_NAME), "FIFO"),
    "mixed save": (
        False,
        lambda f, t: (f / WEIGHTS_NAME).write_bytes((t / "other" / WEIGHTS_NAME).read_bytes()),
        "different saves",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_open_prior_refuses_what_from_pretrained_refuses(tmp_path, case):
    sharded, edit, match = CASES[case]
    buffers = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)}
    p = PriorModel.from_tensors(
        {f"layer{i}.weight": torch.ones(4, 3) for i in range(3)},
        {f"layer{i}.weight": torch.full((4, 3), 0.5) for i in range(3)},
        {f"layer{i}.weight": torch.full((2, 4, 3), 0.1) for i in range(3)},
        buffers=buffers,
    )
    p.save_pretrained(tmp_path / "src")
    p.with_scale(7.0).save_pretrained(tmp_path / "other")
    folder = p.save_pretrained(tmp_path / "p", max_shard_size=200 if sharded else "2GB")
    edit(folder, tmp_path)

    def read_all_lazily(path: Path) -> None:
        lazy = open_prior(path)  # values are checked as the slices are read
        for store in (lazy.mean, lazy.variance, lazy.cov_factor):
            for t in store.values():
                t[...]

    for read in (PriorModel.from_pretrained, read_all_lazily):
        with pytest.raises((PriorFormatError, PriorNotFoundError), match=match):
            read(folder)


def test_open_prior_keeps_the_buffers_and_reads_the_same_prior_as_from_pretrained(tmp_path):
    buffers = {"bn.running_mean": torch.arange(3.0), "bn.num_batches_tracked": torch.tensor(5)}
    p = PriorModel.from_tensors({"w": torch.ones(4, 3)}, variance=0.5, buffers=buffers)
    folder = p.save_pretrained(tmp_path / "p")
    lazy, whole = open_prior(folder), PriorModel.from_pretrained(folder)
    assert lazy.config.to_dict() == whole.config.to_dict()
    assert lazy.buffers.keys() == buffers.keys()
    assert all(torch.equal(lazy.buffers[k], buffers[k]) for k in buffers)
    assert torch.equal(lazy.mean["w"][1:3], whole.mean["w"][1:3])


# --------------------------------------------------------------------------------------------- ranges into a model
def test_init_model_refuses_a_buffer_or_mean_outside_the_model_dtype_and_changes_nothing():
    bn = torch.nn.BatchNorm1d(2)
    huge = {
        "running_mean": torch.zeros(2, dtype=torch.float64),
        "running_var": torch.tensor([1.0, 1e300], dtype=torch.float64),
    }
    p = PriorModel.from_tensors({"weight": torch.full((2,), 3.0)}, variance=1.0, exclude=["bias"], buffers=huge)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(PriorMatchError, match=r"`running_var\.buffer` holds values up to 1e\+300.*float32"):
        p.init_model_(bn)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())  # not even the weight
    assert torch.isfinite(bn.running_var).all()

    lin = torch.nn.Linear(2, 1).half()
    big = PriorModel.from_tensors({"weight": torch.full((1, 2), 1e6)}, variance=1.0, exclude=["bias"])
    with pytest.raises(PriorMatchError, match=r"`weight\.mean` holds values up to 1e\+06.*float16"):
        big.init_model_(lin)
    assert torch.isfinite(lin.weight).all()


def test_loaded_tensors_are_private_and_outlive_the_files(tmp_path):
    import gc
    import shutil

    folder = prior(1.0).save_pretrained(tmp_path / "p")
    loaded = PriorModel.from_pretrained(folder)
    prior(2.0).save_pretrained(folder)  # renamed over the files the prior was read from
    shutil.rmtree(folder)
    gc.collect()
    assert all(bool((t == 1.0).all()) for t in loaded.mean.values())
    other = prior(3.0).save_pretrained(tmp_path / "q")
    first = PriorModel.from_pretrained(other)
    first.mean["layer0.weight"].add_(1.0)  # writable, and private to this prior
    assert bool((PriorModel.from_pretrained(other).mean["layer0.weight"] == 3.0).all())
