"""The documentation keeps up with the code: the adapter contract page is what the code generates, no file cites
the design file that is not in the repository (docs/architecture.md is the source of truth), and README.md stays a
front page whose links to docs/ resolve."""
import re
import subprocess
from pathlib import Path

import pytest

from conformance import contract_page

REPO = Path(__file__).resolve().parents[1]
OUTSIDE_DESIGN_FILE = "DESIGN" + ".md"  # spelled in two parts so this file does not cite it
README_MAX_LINES = 200


@pytest.fixture(autouse=True)
def checkout():
    """The documentation is the repository's: an installed copy of the suite has none to check."""
    if not (REPO / "mkdocs.yml").is_file() or not (REPO / ".git").exists():
        pytest.skip("an installed copy of the suite: docs/ and README.md are the repository's")


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    paths = [REPO / name for name in listed.decode().split("\0") if name]
    return [p for p in paths if p.suffix in (".py", ".md", ".yml", ".toml", ".txt", ".ini", ".html", ".json")
            or p.name == "run"]


def test_contract_page_is_what_the_code_generates():
    assert contract_page.PAGE.read_text() == contract_page.page(), (
        f"{contract_page.PAGE.relative_to(REPO)} is stale: run {contract_page.GENERATOR} and commit it")


def test_no_file_cites_the_design_file_outside_the_repository():
    citing = [f"{p.relative_to(REPO)}:{n}" for p in _tracked_text_files() if p.is_file()
              for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE_DESIGN_FILE in line]
    assert not citing, (f"{OUTSIDE_DESIGN_FILE} is not in the repository; cite a section of docs/architecture.md "
                        f"instead at: {', '.join(citing)}")


def test_readme_is_a_short_front_page_whose_doc_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < README_MAX_LINES, (
        f"README.md has {len(readme.splitlines())} lines; keep it under {README_MAX_LINES}, move the rest to docs/")
    targets = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    missing = [t for t in targets if not (REPO / t).exists()]
    assert targets and not missing, f"README.md links to files that do not exist: {missing}"
