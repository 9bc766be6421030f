"""The project's documents keep the shape their readers rely on."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHANGE_TYPES = ["Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"]


def changelog_sections(text: str) -> dict[str, list[str]]:
    """Map each version heading (``## [...]``) to its change-type headings (``### ...``), in order."""
    sections: dict[str, list[str]] = {}
    version = None
    for line in text.splitlines():
        if line.startswith("## "):
            version = line[3:].strip()
            sections[version] = []
        elif line.startswith("### "):
            assert version is not None, f"change type {line!r} before any version heading"
            sections[version].append(line[4:].strip())
    return sections


def test_changelog_lists_each_change_type_once_per_version_in_keep_a_changelog_order() -> None:
    sections = changelog_sections((ROOT / "CHANGELOG.md").read_text())
    assert "[Unreleased]" in sections
    for version, types in sections.items():
        unknown = [name for name in types if name not in CHANGE_TYPES]
        assert not unknown, f"{version}: change types {unknown} are not Keep a Changelog's {CHANGE_TYPES}"
        assert len(types) == len(set(types)), f"{version}: a change type appears twice: {types}"
        assert types == sorted(types, key=CHANGE_TYPES.index), f"{version}: out of order: {types}"


def test_changelog_check_catches_a_repeated_section() -> None:
    repeated = "## [Unreleased]\n### Fixed\n- a\n### Added\n- b\n### Fixed\n- c\n"
    assert changelog_sections(repeated) == {"[Unreleased]": ["Fixed", "Added", "Fixed"]}


def test_ci_runs_the_test_command_the_readme_gives() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"&& (python -m pytest[^\n`]*)", readme)
    assert command, "README no longer gives the test command"
    assert command.group(1).strip() in ci.splitlines()
