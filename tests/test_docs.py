"""The documentation stays true to the code: docs/flags.md is what scripts/gen_flags_doc.py writes
from the parsers (a flag missing or a default changed fails), and every relative link and image path
in README.md, docs/*.md and bench/README.md exists (anchors included)."""
import re

import pytest

from conftest import REPO, load_script

gen = load_script("scripts/gen_flags_doc.py")

DOCS = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img [^>]*src=\"([^\"]+)\"")


# --------------------------------------------------------------------------------------------
# docs/flags.md
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered():
    return gen.render()


def test_flags_doc_is_current(rendered):
    current = gen.DOC.read_text()
    problems = gen.differences(rendered, current)
    assert problems == [], "docs/flags.md is stale (python scripts/gen_flags_doc.py):\n" + "\n".join(problems)
    assert current == rendered


def test_flags_doc_lists_every_flag_of_every_script_with_its_default(rendered):
    """Read against the parsers themselves, not the renderer: each option of each script that
    lists its own flags has a row in the script's section whose default cell shows the default."""
    rows = gen.rows_by_section(rendered)
    checked = 0
    for relative, factory, same_as in gen.SCRIPTS:
        if same_as:
            continue
        parser = gen.parser_of(relative, factory, False)
        for action in parser._actions:
            if not action.option_strings or action.dest == "help" or action.nargs == 0:
                continue
            key = (f"`{relative}`", ", ".join(f"`{s}`" for s in action.option_strings))
            assert key in rows, f"{relative}: {key[1]} has no row in docs/flags.md"
            default = rows[key][0]
            if action.required:
                assert default == "required", key
            elif action.default is None:
                assert default == "—", key
            elif not isinstance(action.default, (list, tuple)):
                assert f"`{action.default}`" in default, (key, default, action.default)
            checked += 1
    assert checked > 100  # the trainers alone have more than 50 options


def test_check_names_a_missing_flag_and_a_changed_default(rendered):
    """The staleness check can fail: a row removed and a default edited are both reported."""
    lines = rendered.splitlines(keepends=True)
    row = next(i for i, line in enumerate(lines) if line.startswith("| `--stage_init` |"))
    base = next(i for i, line in enumerate(lines) if line.startswith("| `--base_lr` | `0.01` |"))
    stale = lines.copy()
    stale[base] = stale[base].replace("`0.01`", "`0.05`", 1)
    del stale[row]
    problems = gen.differences(rendered, "".join(stale))
    assert problems == sorted([
        "`code/train_ACDC_SSCD.py`: `--base_lr` default '`0.05`', the parser's is '`0.01`'",
        "`code/train_ACDC_SSCD.py`: `--stage_init` missing"])
    assert gen.differences(rendered, rendered) == []
    assert gen.differences(rendered, rendered + "\nedited by hand\n") == ["the text around the tables differs"]


def test_check_command_exits_1_on_a_stale_file_and_0_after_regeneration(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "flags.md"
    monkeypatch.setattr(gen, "DOC", doc)
    assert gen.main(["--check"]) == 1  # no file at all
    assert "is stale" in capsys.readouterr().err
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    doc.write_text(doc.read_text().replace("| `--seed` | `1337` |", "| `--seed` | `7` |", 1))
    assert gen.main(["--check"]) == 1
    assert "`--seed` default '`7`', the parser's is '`1337`'" in capsys.readouterr().err


def test_machine_dependent_default_is_given_for_both_machines(rendered):
    rows = gen.rows_by_section(rendered)
    assert rows[("`code/test_ACDC.py`", "`--device`")][0] == "`cuda` with CUDA, else `cpu`"
    assert rows[("`experiments/compare_acdc.py`", "`--device`")][0] == "`cpu`"  # fixed, not machine-dependent


def test_shared_script_lists_only_its_differences(rendered):
    rows = gen.rows_by_section(rendered)
    promise = {flag: cells for (section, flag), cells in rows.items() if section == "`code/train_PROMISE12_SSCD.py`"}
    assert promise["`--num_classes`"][0] == "`2`"
    assert promise["`--exp`"][0] == "`PROMISE12_SSCD`"
    assert "`--stage_init`" not in promise  # identical to the ACDC trainer's row
    assert "Not taken here: `--method`" in rendered  # the supervised trainer has no SSCD flags


# --------------------------------------------------------------------------------------------
# links
# --------------------------------------------------------------------------------------------
def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def without_fences(text):
    """``text`` without its fenced code blocks."""
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)


def prose(text):
    """``text`` without fenced code blocks and inline code (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", without_fences(text))


def anchors(path):
    """The anchors of a Markdown file's headings."""
    found = set()
    for line in without_fences(path.read_text()).splitlines():
        if line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def dead_links(path, root=REPO):
    """Each relative link or image path in ``path`` whose file (or heading anchor) does not exist."""
    dead = []
    for match in LINK.finditer(prose(path.read_text())):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            dead.append(f"{path.relative_to(root)}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            dead.append(f"{path.relative_to(root)}: {target} (no such heading)")
    return dead


def test_docs_exist():
    names = {p.relative_to(REPO).as_posix() for p in DOCS}
    assert {"README.md", "docs/results.md", "docs/flags.md", "docs/protocol.md", "docs/method.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_dead_relative_link_or_image(path):
    assert dead_links(path) == []


def test_dead_link_check_finds_dead_files_and_anchors(tmp_path):
    (tmp_path / "fig.png").write_bytes(b"png")
    (tmp_path / "other.md").write_text("# Other page\n\n## The `--flag` rule, again\n")
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n![a figure](fig.png) [ok](other.md#the---flag-rule-again) [self](#top)\n"
                    "[web](https://example.org/x) ![gone](figure/missing.png) [bad](other.md#nowhere)\n"
                    '<img src="nothere.png"> [no file](docs/none.md)\n'
                    "```\n[inside a code block](not/checked.md)\n```\n`[inline](not/checked.md)`\n")
    assert dead_links(page, tmp_path) == ["page.md: figure/missing.png (no such file)",
                                          "page.md: other.md#nowhere (no such heading)",
                                          "page.md: nothere.png (no such file)",
                                          "page.md: docs/none.md (no such file)"]


# --------------------------------------------------------------------------------------------
# names cited in docs/method.md
# --------------------------------------------------------------------------------------------
def cited_names(text):
    """(file, name) of each ``test_x.py::test_y`` and ``package.module.function`` cited in ``text``."""
    tests = [(f"tests/{f}", n) for f, n in re.findall(r"(test_\w+\.py)::(test_\w+)", text)]
    code = [(f"code/{pkg}/{mod}.py", n)
            for pkg, mod, n in re.findall(r"`(utils|dataloaders|networks)\.(\w+)\.(\w+)", text)]
    return tests + code


def test_functions_and_tests_cited_in_method_md_exist():
    cited = cited_names((REPO / "docs" / "method.md").read_text())
    assert len(cited) > 40
    missing = [f"{f}: {n}" for f, n in cited
               if not re.search(rf"^\s*(def|class) {n}\b", (REPO / f).read_text(), re.M)]
    assert missing == []


def test_cited_names_are_found_and_a_wrong_one_is_missing(tmp_path):
    text = "`utils.sscd.cgsr` and `test_sscd.py::test_cgsr_branches`, `utils.sscd.no_such_function`"
    assert cited_names(text) == [("tests/test_sscd.py", "test_cgsr_branches"), ("code/utils/sscd.py", "cgsr"),
                                 ("code/utils/sscd.py", "no_such_function")]
    assert not re.search(r"^\s*(def|class) no_such_function\b", (REPO / "code/utils/sscd.py").read_text(), re.M)
