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
    assert ints.names == ["0", "1", "2"] and ints.label_id(2) == 2
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
    with pytest.raises(ValueError, match="integer labels in `label` must be ≥ 0"):
        Columns(datasets.Dataset.from_dict({"text": ["a"], "label": [-1]}))
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
