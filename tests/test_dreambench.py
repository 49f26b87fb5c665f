"""DreamBench importer on the four shared real subjects, its one-line errors, and the report tables."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, assert_one_line

from proxytune import reports
from proxytune.dreambench import PROMPTS_FILE, load_dreambench, parse_prompts_file
from proxytune.params import ProxytuneError

SHARED = REPO.parent / "shared" / "dreambench"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/dreambench not present")


def test_shared_folder_gives_four_subjects_with_their_prompts():
    subjects = {s.name: s for s in load_dreambench(SHARED)}
    assert list(subjects) == ["backpack", "can", "cat", "dog"]  # the file's order, only folders present
    assert {n: (s.class_noun, s.live) for n, s in subjects.items()} == {
        "backpack": ("backpack", False), "can": ("can", False), "cat": ("cat", True), "dog": ("dog", True)}
    dog, can = subjects["dog"].prompts("sks"), subjects["can"].prompts("sks")
    assert len(dog) == len(can) == 25 and len(set(dog)) == 25
    assert dog[0] == "a sks dog in the jungle" and "a sks dog in a purple wizard outfit" in dog
    assert "a sks can floating in an ocean of milk" in can and not any("outfit" in p for p in can)
    spec = parse_prompts_file(SHARED / PROMPTS_FILE)
    assert len(spec.classes) == 30 and spec.classes["bear_plushie"] == "stuffed animal"
    assert [s.name for s in load_dreambench(SHARED, ["dog", "can"])] == ["dog", "can"]


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    shutil.copytree(SHARED, root)
    return root


@pytest.mark.parametrize("bad_line, where", [
    ("backpack;backpack", "expected 'subject_name,class'"),
    ("'a {0} in the jungle'.format(unique_token, class_token),", "{1} (class)"),
    ("'a {0} {1} in the jungle'.format(token),", "expected a prompt"),
])
def test_malformed_prompts_file_is_one_line_naming_file_and_line(tmp_path, bad_line, where):
    root = _copy(tmp_path)
    path = root / PROMPTS_FILE
    lines = path.read_text().splitlines()
    anchor = "backpack,backpack" if "subject_name" in where else "'a {0} {1} in the snow'.format(unique_token, class_token),"
    lines[lines.index(anchor)] = bad_line
    path.write_text("\n".join(lines))
    with pytest.raises(ProxytuneError) as err:
        load_dreambench(root)
    assert_one_line(err, f"{path}:", where)


def test_missing_pieces_are_one_line_errors(tmp_path):
    root = _copy(tmp_path)
    with pytest.raises(ProxytuneError) as err:
        load_dreambench(root, ["dog", "unicorn"])
    assert_one_line(err, "unicorn", PROMPTS_FILE)
    with pytest.raises(ProxytuneError) as err:
        load_dreambench(root, ["dog2"])  # listed, but no folder here
    assert_one_line(err, str(root / "dog2"))
    for f in (root / "cat").iterdir():
        f.unlink()
    with pytest.raises(ProxytuneError) as err:
        load_dreambench(root)
    assert_one_line(err, str(root / "cat"), "no images")
    (root / PROMPTS_FILE).write_text("Classes\nsubject_name,class\ndog,dog\n")
    with pytest.raises(ProxytuneError) as err:
        load_dreambench(root)
    assert_one_line(err, str(root / PROMPTS_FILE), "no object prompts")


def test_aggregate_is_image_weighted_and_delta_is_student_minus_supervisor():
    table = pd.DataFrame([
        {"subject": "a", "method": "student", "prompt": "p", "images": 1, "dino": 0.2, "clip_i": 0.5, "clip_t": 0.1},
        {"subject": "b", "method": "student", "prompt": "p", "images": 3, "dino": 0.6, "clip_i": 0.5, "clip_t": 0.3},
        {"subject": "a", "method": "supervisor", "prompt": "p", "images": 2, "dino": 0.4, "clip_i": 0.7,
         "clip_t": 0.2},
    ])
    summary = reports.with_delta(reports.aggregate(table)).set_index("method")
    assert summary.loc["student", "dino"] == pytest.approx((0.2 + 3 * 0.6) / 4)
    assert summary.loc[reports.DELTA, "dino"] == pytest.approx(0.5 - 0.4)
    assert summary.loc[reports.DELTA, "clip_i"] == pytest.approx(-0.2)
    shuffled = reports.aggregate(table.sample(frac=1, random_state=3)).set_index("method")
    pd.testing.assert_frame_equal(shuffled, summary.drop(reports.DELTA), check_like=True)
    paper = reports.paper_table(summary.reset_index())
    assert list(paper.columns) == ["Method", "DINO", "CLIP-I", "CLIP-T"]
    md = reports.to_markdown(paper).splitlines()
    assert md[0] == "| Method | DINO | CLIP-I | CLIP-T |" and md[-1].startswith("| student - supervisor | 0.100 |")
