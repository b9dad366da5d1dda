"""Every generated result block in README.md and docs/*.md equals what its committed results
file gives now (``tools/readme_results.py``): a figure cannot be retyped or left stale."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_results", ROOT / "tools" / "readme_results.py")
readme_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_results)


@pytest.mark.parametrize("document", readme_results.DOCUMENTS)
def test_result_blocks_match_their_results_files(document):
    text, regenerated = readme_results.regenerate(document)
    assert text == regenerated, f"{document}: stale result block; run python tools/readme_results.py --write"


def test_the_readme_quick_start_output_is_generated():
    blocks = [m.group("spec").split()[0] for m in readme_results.BLOCK.finditer((ROOT / "README.md").read_text())]
    assert "demo" in blocks and "last-table" in blocks


def test_a_stale_block_is_detected(tmp_path, monkeypatch):
    results = tmp_path / "r.md"
    results.write_text("# t\n\n## Run 1\n\n- load average (1, 5, 15 min) at start: 0.1 0.2 0.3\n\n| a |\n|---|\n| 1 |\n")
    doc = tmp_path / "doc.md"
    doc.write_text(f"x\n<!-- results: last-table {results.name} -->\nold\n<!-- end results -->\n")
    monkeypatch.setattr(readme_results, "ROOT", tmp_path)
    text, new = readme_results.regenerate("doc.md")
    assert text != new and "| 1 |" in new and "load average 0.1 0.2 0.3" in new
    doc.write_text(new)
    assert readme_results.regenerate("doc.md")[0] == readme_results.regenerate("doc.md")[1]


def test_the_table_number_picks_a_table_of_the_newest_run(tmp_path, monkeypatch):
    (tmp_path / "r.md").write_text("# t\n\n## Run 1\n\n| old |\n|---|\n\n## Run 2\n\n| a |\n|---|\n\ntext\n\n| b |\n|---|\n")
    (tmp_path / "doc.md").write_text("<!-- results: last-table r.md 2 -->\n<!-- end results -->\n")
    monkeypatch.setattr(readme_results, "ROOT", tmp_path)
    new = readme_results.regenerate("doc.md")[1]
    assert "Run 2" in new and "| b |" in new and "| a |" not in new and "old" not in new
    (tmp_path / "doc.md").write_text("<!-- results: last-table r.md 3 -->\n<!-- end results -->\n")
    with pytest.raises(ValueError, match="has 2 table"):
        readme_results.regenerate("doc.md")
