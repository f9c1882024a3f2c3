"""The repo stands alone: its comments, tests and docs cite docs/ (or public papers and projects), never notes that
live outside it, and every citation into docs/ names a heading that exists.

A citation is the path docs/<name>.md, a space, and the heading in straight double quotes, the heading's text exactly
as written after its #'s (any level from # to ####). No torch needed: this reads files only."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the outside notes the code once cited, spelled in pieces so that this file does not cite them itself
OUTSIDE_NOTES = ["TAN" + "UKI.md", "DES" + "IGN.md", "STY" + "LE.md"]
CITATION = re.compile(r'docs/([A-Za-z0-9_.-]+\.md) "([^"\n]+)"')
HEADING = re.compile(r"^(#{1,4})\s+(.+?)\s*#*\s*$")


def repo_files():
    """The repo's files as git sees them: tracked, plus new ones not ignored (docs written before their first
    commit count too). Without git (an unpacked archive), every file outside .git."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        names = sorted({n for n in out.split("\0") if n})
    except (OSError, subprocess.CalledProcessError):
        names = sorted(os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, files in os.walk(ROOT)
                       if ".git" not in d.split(os.sep) for f in files)
    return [n for n in names if os.path.isfile(os.path.join(ROOT, n))]  # a deleted, uncommitted file is not there


def read_text(name):
    """The file's text, or None for a binary file (NUL bytes or not UTF-8)."""
    with open(os.path.join(ROOT, name), "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def headings(path):
    """Heading texts of a markdown file, outside fenced code blocks."""
    found, fenced = set(), False
    for line in open(path, encoding="utf-8"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line.rstrip("\n"))
        if m:
            found.add(m.group(2))
    return found


def test_no_file_cites_notes_from_outside_the_repo():
    hits = []
    for name in repo_files():
        text = read_text(name)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for note in OUTSIDE_NOTES:
                if note in line:
                    hits.append(f"{name}:{number}: {note}: {line.strip()[:100]}")
    assert not hits, "cite docs/ instead of notes outside the repo:\n" + "\n".join(hits)


def test_every_docs_citation_names_an_existing_heading():
    cache, bad, count = {}, [], 0
    for name in repo_files():
        text = read_text(name)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for doc, heading in CITATION.findall(line):
                count += 1
                path = os.path.join(ROOT, "docs", doc)
                if not os.path.isfile(path):
                    bad.append(f"{name}:{number}: docs/{doc} does not exist")
                    continue
                if path not in cache:
                    cache[path] = headings(path)
                if heading not in cache[path]:
                    bad.append(f"{name}:{number}: docs/{doc} has no heading \"{heading}\"")
    assert count > 0, "no citations into docs/ found: is the citation syntax still the one this test parses?"
    assert not bad, "citations into docs/ that do not resolve:\n" + "\n".join(bad)


def test_docs_headings_are_unique_within_a_file():
    # a citation must land on one place: two sections of the same name in one file would make it ambiguous
    for doc in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        if not doc.endswith(".md"):
            continue
        seen, fenced = {}, False
        for line in open(os.path.join(ROOT, "docs", doc), encoding="utf-8"):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            m = None if fenced else HEADING.match(line.rstrip("\n"))
            if m:
                seen[m.group(2)] = seen.get(m.group(2), 0) + 1
        assert all(n == 1 for n in seen.values()), f"docs/{doc}: repeated headings {[h for h, n in seen.items() if n > 1]}"
