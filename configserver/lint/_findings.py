"""What the check knows of the folders, and the problems it found, each once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..apply_once import line_of
from ..content import TEMPLATE_SUFFIX, VARS_SUFFIX, ContentStore
from ..innovaphone import MODELS
from ..poll import Pipeline
from ..preview import device_names
from ..settings import Settings


@dataclass(frozen=True, order=True)
class Problem:
    """One problem: the file (as the settings name its folder), the line, what is wrong."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class Findings:
    """The snapshot under check, the settings it was read with, and the problems found so far.

    A problem found while rendering for several devices is reported once, naming the first
    device and how many more.
    """

    def __init__(self, store: ContentStore, pipeline: Pipeline, settings: Settings, config_file: Path | None) -> None:
        self.store, self.snapshot, self.settings, self.pipeline = store, store.snapshot, settings, pipeline
        self.fixes = store.snapshot.fixes
        self.config_label = str(config_file) if config_file else "settings"
        self.config_text = config_file.read_text(errors="replace") if config_file and config_file.is_file() else ""
        self.named = device_names(self.snapshot, self.fixes)   # MAC -> the hwids files name for it
        self.file_models = self._models_named_by_files()
        self.known_models = MODELS | set(self.file_models)
        self._found: dict[tuple[str, int, str], list[str]] = {}

    def add(self, file: str, line: int | None, message: str, device: str | None = None) -> None:
        key = (file, line or 1, message)
        if key in self._found and not self._found[key]:
            return   # found without rendering (a syntax error): true for every device
        devices = self._found.setdefault(key, [])
        if device and device not in devices:
            devices.append(device)

    def problems(self) -> list[Problem]:
        problems = []
        for (file, line, message), devices in self._found.items():
            if devices:
                more = f" and {len(devices) - 1} more" if len(devices) > 1 else ""
                message = f"{message} (for {devices[0]}{more})"
            problems.append(Problem(file, line, message))
        return sorted(problems)

    def template_file(self, name: str) -> str:
        return str(Path(self.settings.templates) / name)

    def vars_file(self, name: str) -> str:
        return str(Path(self.settings.vars) / name)

    def _models_named_by_files(self) -> dict[str, str]:
        """Models that device and model files name: casefolded -> as first spelled."""
        models: dict[str, str] = {}
        for hwids in self.named.values():
            for hwid in sorted(hwids):
                model = hwid.rsplit("-", 3)[0]
                models.setdefault(model.casefold(), model)
        for folder, suffix in ((self.snapshot.templates, TEMPLATE_SUFFIX), (self.snapshot.vars, VARS_SUFFIX)):
            for name in sorted(folder):
                if name.startswith("models/") and name.endswith(suffix) and name.count("/") == 1:
                    model = name[len("models/"):-len(suffix)]
                    models.setdefault(model.casefold(), model)
        return models


def find_line(text: str, pattern: str) -> int:
    """The line of `text` where `pattern` first matches, else 1."""
    match = re.search(pattern, text, re.MULTILINE)
    return line_of(text, match.start()) if match else 1
