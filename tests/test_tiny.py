"""The tiny builders are reproducible across processes, not just within one."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

SNIPPET = """
import json, sys
sys.path.insert(0, {repo!r})
from proxytune.prompts import corpus_words
from testbed.tiny_supervisors import train_clip_tokenizer
t = train_clip_tokenizer(corpus_words())
print(json.dumps([t.get_vocab(), t("a sks toy on the beach").input_ids], sort_keys=True))
"""


def test_clip_tokenizer_is_identical_in_every_process():
    outputs = {subprocess.run([sys.executable, "-c", SNIPPET.format(repo=str(REPO))], capture_output=True,
                              text=True, check=True, env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout
               for seed in (1, 2, 3)}
    assert len(outputs) == 1 and outputs.pop().strip()
