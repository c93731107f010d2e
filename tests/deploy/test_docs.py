"""The docs pipeline, checked offline: nbdev processes the notebooks as `nbdev-docs` would, nbconvert renders
each to HTML (Quarto cannot be installed here), and headless Chromium opens every page: its title and its
prose must be there."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _sidebar_entries(contents: list) -> list[str]:
    "The pages of a Quarto sidebar, sections flattened, in order."
    pages = []
    for entry in contents:
        if isinstance(entry, str): pages.append(entry)
        elif "section" in entry: pages += _sidebar_entries(entry.get("contents", []))
        else: pages.append(entry["href"])
    return pages


def _sidebar() -> list[str]:
    sidebar = yaml.safe_load((ROOT / "nbs" / "sidebar.yml").read_text())["website"]["sidebar"]
    return _sidebar_entries(sidebar["contents"])


def test_sidebar_covers_every_notebook():
    "Every notebook (index aside) is in the sidebar, once; every page the sidebar names exists."
    pages = _sidebar()
    notebooks = {p.name for p in (ROOT / "nbs").glob("*.ipynb")} - {"index.ipynb"}
    listed = [p for p in pages if p.endswith(".ipynb") and p != "index.ipynb"]
    assert not notebooks - set(listed), f"notebooks missing from nbs/sidebar.yml: {sorted(notebooks - set(listed))}"
    missing = [p for p in pages if not (ROOT / "nbs" / p).is_file()]
    assert not missing, f"nbs/sidebar.yml names pages that do not exist: {missing}"
    assert len(pages) == len(set(pages)), f"pages listed twice: {sorted({p for p in pages if pages.count(p) > 1})}"
    assert pages[0] == "index.ipynb" and pages[1] == "08_config.ipynb", "the docs open with the index, then config"


def test_index_reads_in_sidebar_order():
    "The reading order of the docs index (nbs/index.ipynb) is the sidebar's."
    index = "".join("".join(c["source"]) for c in json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"])
    section = index.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"\((\w+|explanations/[\w.]+)\)", section)
    in_sidebar = [p.removesuffix(".ipynb") for p in _sidebar() if p != "index.ipynb"]
    assert named == in_sidebar


def _first_markdown(nb: dict) -> tuple[str, str]:
    "The H1 title and the first line of prose after it."
    title = prose = None
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown": continue
        for line in "".join(cell["source"]).splitlines():
            line = line.strip()
            if title is None and line.startswith("# "): title = line[2:].strip()
            elif title and line and not line.startswith(("#", ">", "|", "`", "-", "!", "<", "`")) and prose is None:
                prose = line.split("`")[0].split("[")[0].split("*")[0][:40].strip()
        if title and prose: break
    return title, prose


def _front_matter_to_title(nb: dict) -> None:
    "Render nbdev's YAML front matter (title, description) as the page heading, as Quarto does."
    src = "".join(nb["cells"][0]["source"])
    if nb["cells"][0]["cell_type"] == "markdown" and src.startswith("---"):
        meta = yaml.safe_load(src.split("---")[1])
        nb["cells"][0]["source"] = f"# {meta['title']}\n\n> {meta.get('description', '')}\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    # in a child process: nbdev runs the notebooks' show_doc cells in an IPython shell, whose history module
    # replaces sqlite3's process-wide "timestamp" converter and breaks Feast's SQLite online store afterwards
    subprocess.run([sys.executable, "-c", "import sys; from nbdev.serve import proc_nbs; "
                    "proc_nbs(path=sys.argv[1], n_workers=0, force=True)", str(ROOT / "nbs")], check=True)
    proc = ROOT / "_proc"
    html = tmp_path_factory.mktemp("html")
    nbs = []
    for p in sorted(proc.glob("*.ipynb")):  # nbdev marks cells with keys of its own that nbformat refuses
        nb = json.loads(p.read_text())
        for cell in nb["cells"]:
            for k in set(cell) - {"cell_type", "source", "metadata", "outputs", "execution_count", "id", "attachments"}:
                del cell[k]
            cell["metadata"] = {}
        _front_matter_to_title(nb)
        (html / p.name).write_text(json.dumps(nb))
        nbs.append(html / p.name)
    subprocess.run([str(ROOT / ".venv/bin/jupyter"), "nbconvert", "--to", "html", "--output-dir", str(html),
                    "--log-level", "WARN", *map(str, nbs)], check=True)
    return proc, html


def test_every_notebook_is_processed(site):
    proc, _ = site
    assert {p.name for p in proc.glob("*.ipynb")} == {p.name for p in (ROOT / "nbs").glob("*.ipynb")}
    assert (proc / "sidebar.yml").exists() and (proc / "_quarto.yml").exists()


@pytest.mark.skipif(not CHROMIUM and not __import__("os").environ.get("CI"), reason="chromium not installed")
def test_pages_render_in_chromium(site, tmp_path):
    proc, html = site
    assert CHROMIUM, "chromium is required in CI (apt-get install chromium)"
    for nb_path in sorted((ROOT / "nbs").glob("*.ipynb")):
        title, prose = _first_markdown(json.loads(nb_path.read_text()))
        assert title and prose, f"{nb_path.name} lacks a title or prose"
        page = html / f"{nb_path.stem}.html"
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                              page.as_uri()], capture_output=True, text=True, timeout=120).stdout
        assert f">{title}<" in dom or f">{title}\n" in dom or title in dom, f"{page.name}: title {title!r} missing"
        assert prose in dom, f"{page.name}: prose {prose!r} missing"


def test_workflow_builds_the_site_and_publishes_it_from_main():
    "The GitHub workflow builds the docs with nbdev-docs on Quarto's setup action; only a push to main deploys them."
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ci-cd.yaml").read_text())
    docs, pages = wf["jobs"]["docs"], wf["jobs"]["pages"]
    uses = [s.get("uses", "") for s in docs["steps"]]
    assert any(u.startswith("quarto-dev/quarto-actions/setup@") for u in uses)
    assert any(s.get("run") == "make docs" for s in docs["steps"]) and "nbdev-docs" in (ROOT / "Makefile").read_text()
    upload = next(s for s in docs["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact@"))
    main_only = "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    assert upload["if"] == main_only and upload["with"]["path"] == "_docs"
    assert pages["if"] == main_only and set(pages["needs"]) == {"test", "docs"}
    assert pages["permissions"] == {"pages": "write", "id-token": "write"}
    assert pages["environment"]["name"] == "github-pages"
    assert [s["uses"].split("@")[0] for s in pages["steps"]] == ["actions/deploy-pages"]
    assert wf["permissions"] == {"contents": "read"}  # nothing else gets the Pages rights
