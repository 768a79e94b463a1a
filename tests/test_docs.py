"""The documentation: the README stays short, and every relative link and image in the Markdown pages resolves."""
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # the docs' figures and links: checked with the whole suite

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "benchmark/README.md", "docs/scripts.md"]


def slug(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(text):
    """Targets of [text](target) and ![alt](target) outside code blocks."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_and_images_resolve(page):
    path = ROOT / page
    for target in links(path.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{page}: {target} does not exist"
        if anchor and dest.suffix == ".md":
            heads = [slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)]
            assert anchor in heads, f"{page}: no heading #{anchor} in {dest.name}"


def test_readme_is_short_and_the_repository_has_a_licence():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_link_checker_catches_a_broken_link(tmp_path):
    """The checker above is not vacuous: a page with a missing image and a missing anchor has both found."""
    assert links("see ![a](missing.png) and [b](README.md#nowhere)\n```\n[c](ignored.md)\n```") == \
        ["missing.png", "README.md#nowhere"]
    assert slug("Deviations in detail") == "deviations-in-detail"
    assert slug("`toy2d.py`: DMD Figure 3") == "toy2dpy-dmd-figure-3"


def test_the_readme_file_table_gives_each_file_its_length():
    rows = re.findall(r"^\| \[`([^`]+\.py)`\]\([^)]+\) \|.*\| (\d+) \|$", (ROOT / "README.md").read_text(), flags=re.M)
    assert len(rows) >= 7
    for path, n in rows:
        assert len((ROOT / path).read_text().splitlines()) == int(n), f"README: {path} is not {n} lines long"


def test_the_method_files_put_the_method_first_and_the_readme_says_where_it_ends():
    """dmd.py, add.py and teacher.py read top to bottom: train() ends within the lines the README gives (the method
    before it, one banner after it), within issue 31's budgets; the banner comes right after train()."""
    import ast
    text = (ROOT / "README.md").read_text()
    budget = {"dmd.py": (450, 150), "add.py": (600, 160), "teacher.py": (200, 90)}
    for path, (top, loop) in budget.items():
        src = (ROOT / path).read_text()
        train = next(n for n in ast.parse(src).body if getattr(n, "name", "") == "train")
        row = rf"^\| \[`{re.escape(path)}`\].*\| lines 1–(\d+) \(to the end of `train\(\)`\) \|"
        shown = re.search(row, text, re.M)
        assert shown and int(shown.group(1)) == train.end_lineno, f"README: {path}'s method ends at {train.end_lineno}"
        assert train.end_lineno <= top and train.end_lineno - train.lineno + 1 <= loop, path
        after = src.splitlines()[train.end_lineno:train.end_lineno + 6]
        assert any("Below: loading, data, command line and run plumbing" in ln for ln in after), path
        assert src.count("Below: loading, data, command line and run plumbing") == 1, path
