"""Keep README.md and docs/*.md true: relative links resolve and every `--flag` given to an
iosd-* command exists on that command. Reads Markdown and click objects only (no torch)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The console scripts of pyproject.toml's [project.scripts]; these modules import without torch.
COMMANDS = {
    "iosd-gen": "iosd.pipeline.cli",
    "iosd-train": "iosd.train.cli",
    "iosd-eval": "iosd.evaluate.cli",
    "iosd-predict": "iosd.evaluate.predict_cli",
    "iosd-synth": "iosd.pipeline.synth_cli",
    "iosd-shards": "iosd.pipeline.shards_cli",
}

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.S)
COMMENT = re.compile(r"(^|\s)#.*")
INVOCATION = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, COMMANDS)) + r")(?![\w-])")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
SEPARATOR = re.compile(r"&&|\|\||;|\s\|\s")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*\b(?:src|href)=\"([^\"]+)\"", re.I)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def _split(text: str):
    """(code-block lines, prose chunks): each as (first line number, text). A code block's
    logical lines join backslash continuations and drop shell comments; prose chunks are
    paragraphs, each table row its own chunk."""
    code, prose, chunk, pending, fenced = [], [], [], None, False

    def flush():
        if chunk:
            prose.append((chunk[0][0], "\n".join(line for _, line in chunk)))
            chunk.clear()

    for number, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            flush()
            fenced = not fenced
            continue
        if fenced:
            line = COMMENT.sub("", line).rstrip()
            start, line = (pending[0], pending[1] + " " + line) if pending else (number, line)
            pending = (start, line[:-1]) if line.endswith("\\") else None
            if pending is None:
                code.append((start, line))
        elif not line.strip():
            flush()
        elif line.lstrip().startswith("|"):
            flush()
            prose.append((number, line))
        else:
            chunk.append((number, line))
    flush()
    return code, prose


def snippets(text: str):
    """(line number, text) of every code-block line and inline code span."""
    code, prose = _split(text)
    found = list(code)
    for start, chunk in prose:
        for m in CODE_SPAN.finditer(chunk):
            found.append((start + chunk[: m.start()].count("\n"), m.group(2).replace("\n", " ")))
    return sorted(found, key=lambda item: item[0])


def invocations(snippet: str):
    """(command, [--flags]) for each iosd-* command in a snippet: the flags after it, up to the
    next iosd-* command or shell separator (&&, ||, ;, a spaced |)."""
    for segment in SEPARATOR.split(snippet):
        hits = list(INVOCATION.finditer(segment))
        if not hits:
            continue
        ends = [h.start() for h in hits[1:]] + [len(segment)]
        for hit, end in zip(hits, ends, strict=True):
            yield hit.group(1), FLAG.findall(segment[hit.end() : end])


def links(text: str):
    """(line number, target) of every Markdown link and image, reference link and HTML
    src/href outside code."""
    _, prose = _split(text)
    for start, chunk in prose:
        plain = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), chunk)
        for pattern in (LINK, REF_LINK, HTML_SRC):
            for m in pattern.finditer(plain):
                yield start + plain[: m.start()].count("\n"), m.group(1)


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)) or target.startswith("#")


def _long_options(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(o for o in param.opts + param.secondary_opts if o.startswith("--"))
    return names


@pytest.fixture(scope="module")
def options() -> dict[str, set[str]]:
    found = {}
    for name, module in COMMANDS.items():
        command = importlib.import_module(module).main
        names = _long_options(command)
        if isinstance(command, click.Group):  # iosd-shards: any subcommand's option counts
            for sub in command.commands.values():
                names |= _long_options(sub)
        found[name] = names
    return found


def test_the_parsers_on_a_sample():
    sample = (
        "Run `torchrun --nproc-per-node 8 $(which iosd-gen) --classes coco` or `iosd-train\n"
        "SHARDS [--head iosd|gd|iosd-lite] [--lr]`; `--feature-dtype fp8`, `iosd-lite`.\n\n"
        "| a | `iosd-shards show DIR --n 3` |\n\n"
        "```bash\n"
        "iosd-gen --recipe gd \\\n    --split 1   # not --a-flag\n"
        "iosd-train x && iosd-eval --objects 2 | tee log\n"
        "#    --classes FILE\n"
        "```\n"
        "![pic `x` (y)](docs/a.png) [page](b.md#part) [web](https://x.org) [top](#iosd)\n"
    )
    found = [(c, f) for _, s in snippets(sample) for c, f in invocations(s)]
    assert found == [
        ("iosd-gen", ["--classes"]),
        ("iosd-train", ["--head", "--lr"]),
        ("iosd-shards", ["--n"]),
        ("iosd-gen", ["--recipe", "--split"]),
        ("iosd-train", []),
        ("iosd-eval", ["--objects"]),
    ]
    targets = [t for _, t in links(sample)]
    assert targets == ["docs/a.png", "b.md#part", "https://x.org", "#iosd"]
    assert [t for t in targets if not is_external(t)] == ["docs/a.png", "b.md#part"]


def test_every_relative_link_points_to_a_file():
    broken, checked = [], 0
    for doc in doc_files():
        for number, target in links(doc.read_text(encoding="utf-8")):
            if is_external(target):
                continue
            path = target.split("#", 1)[0].split("?", 1)[0]
            checked += 1
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)}:{number}: {target}")
    assert checked, "no relative links found: is the parser broken?"
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    """The anchors a page's headings make (repeats get -1, -2, ...); code-block lines are no headings."""
    text = doc.read_text(encoding="utf-8")
    code_lines = {number for number, _ in _split(text)[0]}
    seen: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), 1):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and number not in code_lines:
            slug = _slug(m.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def test_every_anchor_into_a_markdown_page_exists():
    broken = []
    for doc in doc_files():
        text = doc.read_text(encoding="utf-8")
        for number, target in links(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or "#" not in target:
                continue
            path, anchor = target.split("#", 1)
            page = doc if not path else doc.parent / path
            if page.suffix == ".md" and page.exists() and anchor not in _anchors(page):
                broken.append(f"{doc.relative_to(ROOT)}:{number}: {target}")
    assert not broken, "anchors that no heading makes:\n" + "\n".join(broken)


def test_every_flag_given_to_an_iosd_command_exists(options):
    unknown, used = [], set()
    for doc in doc_files():
        for number, snippet in snippets(doc.read_text(encoding="utf-8")):
            for command, flags in invocations(snippet):
                used.add(command)
                for flag in flags:
                    if flag not in options[command]:
                        unknown.append(f"{doc.relative_to(ROOT)}:{number}: {command} {flag}")
    assert not unknown, "flags the commands do not have:\n" + "\n".join(unknown)
    assert used == set(COMMANDS), f"commands the docs never show: {set(COMMANDS) - used}"


def test_the_readme_lists_every_docs_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {(ROOT / t.split("#", 1)[0]).resolve() for _, t in links(text) if not is_external(t)}
    pages = sorted((ROOT / "docs").glob("**/*.md"))
    assert pages, "docs/ holds no pages"
    missing = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked]
    assert not missing, f"docs pages the README's Documentation list does not link: {missing}"
