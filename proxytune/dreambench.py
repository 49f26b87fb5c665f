"""DreamBench importer: a folder laid out like google/dreambooth's `dataset/` becomes a list of subjects.

The layout: one folder of 4-6 photos per subject, and `prompts_and_classes.txt`, which lists
`subject_name,class` rows under "Classes" and two Python-style prompt lists (object prompts, then live
subject prompts; 25 each) whose entries read `'a {0} {1} in the jungle'.format(unique_token, class_token)`.
Live subjects are DreamBench's cats and dogs (the dataset card: "9 live subjects (dogs and cats)"); the
file itself does not mark them, so that rule lives here. A folder need not hold every listed subject.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from proxytune.params import ProxytuneError

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("cat", "dog")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_ROW = re.compile(r"^([A-Za-z0-9_-]+),([A-Za-z][A-Za-z ]*)$")
_PROMPT = re.compile(r"""^['"](.*)['"]\.format\(\s*unique_token\s*,\s*class_token\s*\),?$""")


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    live: bool
    images: Path
    templates: tuple[str, ...] = field(repr=False)  # str.format templates: {0} identifier, {1} class noun

    def prompts(self, identifier: str) -> list[str]:
        """The subject's 25 prompts with `identifier` as the [V] token."""
        return [t.format(identifier, self.class_noun) for t in self.templates]


@dataclass(frozen=True)
class PromptsFile:
    classes: dict[str, str]  # subject name -> class noun, in file order
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]


def parse_prompts_file(path: str | Path) -> PromptsFile:
    """Read `prompts_and_classes.txt`; any line that fits none of its sections is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise ProxytuneError(f"{path}: DreamBench prompts file not found")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    section, current = None, None
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        where = f"{path}:{lineno}"
        if not line or line in ("Prompts", "subject_name,class"):
            continue
        if line == "Classes":
            section = "classes"
        elif line in ("Object Prompts", "Live Subject Prompts"):
            section, current = line.split()[0].lower(), None
        elif section == "classes":
            m = _ROW.match(line)
            if not m:
                raise ProxytuneError(f"{where}: expected 'subject_name,class', got {line!r}")
            if m.group(1) in classes:
                raise ProxytuneError(f"{where}: subject {m.group(1)!r} listed twice")
            classes[m.group(1)] = m.group(2).strip()
        elif section in ("object", "live"):
            if line.startswith("prompt_list") and line.endswith("["):
                if section in lists:
                    raise ProxytuneError(f"{where}: second prompt list in the {section} section")
                current = lists[section] = []
            elif line == "]":
                current = None
            elif current is not None and (m := _PROMPT.match(line)):
                if "{0}" not in m.group(1) or "{1}" not in m.group(1):
                    raise ProxytuneError(f"{where}: prompt must contain {{0}} (identifier) and {{1}} (class)")
                current.append(m.group(1))
            else:
                raise ProxytuneError(f"{where}: expected a prompt like \"'a {{0}} {{1}} ...'.format(unique_token, "
                                     f"class_token),\", got {line!r}")
        else:
            raise ProxytuneError(f"{where}: text outside the Classes / Prompts sections: {line!r}")
    for name, what in (("classes", classes), ("object", lists.get("object")), ("live", lists.get("live"))):
        if not what:
            raise ProxytuneError(f"{path}: no {name if name == 'classes' else name + ' prompts'} found")
    return PromptsFile(classes, tuple(lists["object"]), tuple(lists["live"]))


def load_dreambench(root: str | Path, names: list[str] | None = None) -> list[Subject]:
    """The subjects present under `root` (or exactly `names`), in the prompts file's order."""
    root = Path(root)
    if not root.is_dir():
        raise ProxytuneError(f"{root}: DreamBench folder not found")
    spec = parse_prompts_file(root / PROMPTS_FILE)
    for name in names or []:
        if name not in spec.classes:
            raise ProxytuneError(f"{root / PROMPTS_FILE}: no subject {name!r} in its class list")
    wanted = names if names else [n for n in spec.classes if (root / n).is_dir()]
    subjects = []
    for name in wanted:
        folder = root / name
        if not folder.is_dir():
            raise ProxytuneError(f"{folder}: subject folder not found")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
            raise ProxytuneError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        noun = spec.classes[name]
        live = noun in LIVE_CLASSES
        subjects.append(Subject(name, noun, live, folder, spec.live_templates if live else spec.object_templates))
    if not subjects:
        raise ProxytuneError(f"{root}: none of the {len(spec.classes)} subjects in {PROMPTS_FILE} has a folder")
    return subjects
