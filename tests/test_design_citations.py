"""Design notes the code cites live in the repository (docs/), and every cited section exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"DESIGN\.md §(\d+)")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml", "*.yml", "*.yaml", "Dockerfile*"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if (REPO / n).is_file()]


def test_every_cited_design_section_exists() -> None:
    sections = set(re.findall(r"^## (\d+)\. ", (REPO / "docs" / "DESIGN.md").read_text(), re.MULTILINE))
    cited = {(path.relative_to(REPO).as_posix(), number)
             for path in tracked_text_files() for number in CITATION.findall(path.read_text(encoding="utf-8"))}
    assert len(cited) >= 5  # the engine, the exit rules, metrics, measuring ...
    assert not [c for c in cited if c[1] not in sections], sections


def test_no_citation_points_outside_the_repository() -> None:
    outside = re.compile(r"shared/notes|\.\./shared/DESIGN|shared/DESIGN\.md")
    hits = [f"{path.relative_to(REPO)}:{n}" for path in tracked_text_files() if path != Path(__file__).resolve()
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert not hits, hits
    assert (REPO / "docs" / "onnxruntime.md").is_file()
