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


def changelog_problems(text: str) -> list[str]:
    """What breaks Keep a Changelog's shape: unknown change types, one listed twice under a version, or out of order."""
    problems = []
    for version, types in changelog_sections(text).items():
        if unknown := [name for name in types if name not in CHANGE_TYPES]:
            problems.append(f"{version}: change types {unknown} are not Keep a Changelog's {CHANGE_TYPES}")
        elif len(types) != len(set(types)):
            problems.append(f"{version}: a change type appears twice: {types}")
        elif types != sorted(types, key=CHANGE_TYPES.index):
            problems.append(f"{version}: out of order: {types}")
    return problems


def test_changelog_lists_each_change_type_once_per_version_in_keep_a_changelog_order() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "[Unreleased]" in changelog_sections(text)
    assert changelog_problems(text) == []


def test_changelog_check_catches_a_repeated_a_misordered_and_an_unknown_section() -> None:
    assert changelog_problems("## [Unreleased]\n### Fixed\n- a\n### Added\n- b\n### Fixed\n- c\n") == [
        "[Unreleased]: a change type appears twice: ['Fixed', 'Added', 'Fixed']"]
    assert changelog_problems("## [1.0.0]\n### Fixed\n- a\n### Added\n- b\n") == [
        "[1.0.0]: out of order: ['Fixed', 'Added']"]
    assert "not Keep a Changelog's" in changelog_problems("## [1.0.0]\n### Improved\n- a\n")[0]


def test_ci_runs_the_test_command_the_readme_gives() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"&& (python -m pytest[^\n`]*)", readme)
    assert command, "README no longer gives the test command"
    assert command.group(1).strip() in ci.splitlines()


def test_readme_lists_every_public_error():
    """Each exception class cptv_plugin exports has a row in README's "Errors you can catch", with its built-in base."""
    import cptv_plugin

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Errors you can catch"):readme.index("## Benchmarks")]
    errors = [getattr(cptv_plugin, n) for n in cptv_plugin.__all__
              if isinstance(getattr(cptv_plugin, n), type) and issubclass(getattr(cptv_plugin, n), Exception)]
    assert len(errors) >= 12
    for error in errors:
        row = next((line for line in table.splitlines() if line.startswith(f"| `{error.__name__}` |")), None)
        assert row is not None, f"{error.__name__} is missing from README's error table"
        assert f"| `{error.__mro__[1].__name__}` |" in row, f"{error.__name__}: README names the wrong base class"
