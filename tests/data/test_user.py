"""priorzoo.data.user: one loader, one label rule, one error per kind of bad input."""

from __future__ import annotations

import pytest

from priorzoo.data.user import Columns, check_csv_rows, load_data

datasets = pytest.importorskip("datasets")


def test_label_rule_classlabel_integers_and_strings() -> None:
    names = datasets.ClassLabel(names=["zebra", "ant"])
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).cast_column("label", names)
    assert Columns(ds).names == ["zebra", "ant"]  # a ClassLabel keeps its own order
    ints = Columns(datasets.Dataset.from_dict({"text": ["a", "b"], "label": [2, 0]}))
    assert ints.names == ["0", "2"] and ints.label_id(2) == 1  # integers are names: 2 classes, not 3
    strs = Columns(datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["b", "a", "b"]}))
    assert strs.names == ["a", "b"] and [strs.label_id(v) for v in ("a", "b")] == [0, 1]
    test = datasets.Dataset.from_dict({"text": ["d"], "label": ["c"]})
    assert Columns(datasets.Dataset.from_dict({"text": ["a"], "label": ["b"]}), others=[test]).names == ["b", "c"]


def test_bad_inputs_each_get_a_clear_error(tmp_path) -> None:
    empty = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["x", " ", None]})
    with pytest.raises(ValueError, match=r"`label` has 2 empty cell\(s\) in the training data \(rows 1, 2\)"):
        Columns(empty)
    with pytest.raises(ValueError, match=r"`--label-column` 'y' is not a column"):
        Columns(empty, label="y")
    with pytest.raises(ValueError, match="no label column"):
        Columns(datasets.Dataset.from_dict({"text": ["a"]}))
    assert Columns(datasets.Dataset.from_dict({"text": ["a"]}), need_label=False).names == []
    signed = Columns(datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, -1, 0]}))
    assert signed.names == ["-1", "0", "1"]  # -1/0/1 sentiment labels are names too
    unlabelled = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, -1]})
    unlabelled = unlabelled.cast_column("label", datasets.ClassLabel(names=["x", "y"]))
    with pytest.raises(ValueError, match=r"`label` has 1 empty cell\(s\) in the training data \(rows 1\)"):
        Columns(unlabelled)  # a ClassLabel -1 is the Hub's "no label"
    with pytest.raises(ValueError, match=r"label 'z' of `label` is not one of the 2 classes \('a', 'b'\)"):
        Columns(datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["a", "b"]})).label_id("z")
    one = Columns(datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 1]}))
    with pytest.raises(ValueError, match=r"has 1 class \(`label`: \['p'\]\)"):
        Columns(datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["p", "p"]})).check_classification(2)
    with pytest.raises(ValueError, match=r"has 1 example\(s\)"):
        one.check_classification(1)

    uneven = tmp_path / "u.tsv"
    uneven.write_text("text\tlabel\na\t0\nb\t1\textra\n")
    with pytest.raises(ValueError, match=r"`u.tsv` line 3 has 3 fields, but the header \(text, label\) has 2"):
        load_data(uneven)
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(ValueError, match="is empty: a CSV needs a header row"):
        check_csv_rows(tmp_path / "e.csv")
    with pytest.raises(ValueError, match="`data_format` must be one of"):
        load_data(uneven, data_format="xml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(tmp_path / "nope.csv", data_format="csv")


def test_integer_labels_are_names_with_contiguous_ids() -> None:
    sparse = Columns(datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [10, 1, 2, 10]}))
    assert sparse.names == ["1", "2", "10"] and sparse.num_labels == 3
    assert [sparse.label_id(v) for v in (1, 2, 10)] == [0, 1, 2]
    assert sparse.id2label == {0: "1", 1: "2", 2: "10"}
    huge = Columns(datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 10**8]}))
    assert huge.num_labels == 2 and huge.label_id(10**8) == 1  # never a 10⁸-class head


def test_mixed_and_string_labels_follow_the_same_rule(tmp_path) -> None:
    # the same labels read as integers or as strings (a CSV with one non-numeric label) give the same ids
    as_strings = Columns(datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": ["10", "2", " x", "1"]}))
    assert as_strings.names == ["1", "2", "10", "x"]
    assert as_strings.label_id(10) == as_strings.label_id("10") == 2
    floats = Columns(datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [2.0, 0.5, 1.0]}))
    assert floats.names == ["0.5", "1", "2"]
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na,1\nb,100000000\nc,1\n")
    cols = Columns(load_data(csv))
    assert cols.names == ["1", "100000000"] and cols.label_id(100000000) == 1


def test_evaluation_splits_are_aligned_by_name(tmp_path) -> None:
    from PIL import Image

    def folder(name: str, classes: list[str]):
        for c in classes:
            (tmp_path / name / c).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / name / c / "x.png")
        return load_data(tmp_path / name)

    train = folder("train", ["ant", "bee", "cat"])
    val = folder("val", ["bee", "cat", "dog"])  # ids 0, 1, 2 here mean other classes than in train
    cols = Columns(train, others=[val])
    assert cols.names == ["ant", "bee", "cat", "dog"]
    assert [cols.label_id(r) for r in train["label"]] == [0, 1, 2]
    assert sorted(cols.label_id(r) for r in cols.align(val)["label"]) == [1, 2, 3]
    assert cols.align(train) is train
    raw = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [10, 1]})
    named = datasets.Dataset.from_dict({"text": ["c"], "label": [0]}).cast_column(
        "label", datasets.ClassLabel(names=["10"])
    )
    cols = Columns(raw, others=[named])
    assert [cols.label_id(v) for v in cols.align(named)["label"]] == [1]
