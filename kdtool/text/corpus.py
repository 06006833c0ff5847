"""The embedded default corpus: real text that is available offline.

Sources, in this order of preference (see docs/models-data.md for licences):
- Debian text packages fetched once by `scripts/fetch-corpus` into `$KDTOOL_HOME/corpus/<package>/`
  (`apt-get download` + `dpkg-deb -x`, no root needed):
  `austen` (r-cran-janeaustenr: Jane Austen's six novels, public domain; read from the R
  package's lazy-load database), `python-docs` (python3.X-doc: the reST sources of the Python
  documentation), `debian-reference` (debian-reference-en: the Debian Reference book, plain
  text), `manpages` (Linux man-pages sections 2-7, groff markup stripped).
- Always present: `stdlib-topics` (pydoc_data.topics: the language reference pages `help()`
  shows) and `stdlib-docstrings` (module, class and function docstrings of the standard library,
  read with `ast`, never imported).

`embedded_corpus()` interleaves the sources so that any prefix has about the same mixture as
the whole (each source advances in proportion to its size estimate), in a fixed order: the
same files give the same document stream on every run.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import heapq
import json
import os
import platform
import re
import stat
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from kdtool.embedded import kdtool_home
from kdtool.errors import BadInput
from kdtool.formats import atomic_path
from kdtool.text import rdata
from kdtool.text.debian import sources_dir

#: The Debian packages scripts/fetch-corpus downloads (python3.X-doc: the version apt offers).
PACKAGES = ("r-cran-janeaustenr", "python3.11-doc", "debian-reference-en", "manpages")


def corpus_home() -> Path:
    """Where scripts/fetch-corpus unpacks the Debian packages: $KDTOOL_HOME/sources (shared with probe concepts)."""
    return sources_dir()


# --------------------------------------------------------------------------------------- sources


AUSTEN_ORDER = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$")


def _austen(root: Path) -> Iterator[str]:
    rdx = next(iter(sorted(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"))), None)
    if rdx is None:
        return
    books = rdata.read_lazyload(rdx.with_suffix(""))
    for name in AUSTEN_ORDER:
        lines = books.get(name)
        if not isinstance(lines, list):
            continue
        chapter: list[str] = []
        for line in lines:
            line = line or ""
            if _CHAPTER.match(line) and chapter:
                yield _paragraphs("\n".join(chapter))
                chapter = []
            chapter.append(line)
        if chapter:
            yield _paragraphs("\n".join(chapter))


def _paragraphs(text: str) -> str:
    """Unwrap hard-wrapped prose: lines of a paragraph joined by spaces, paragraphs by a blank line."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paras if p).strip()


def _python_docs(root: Path) -> Iterator[str]:
    seen: set[Path] = set()  # python3.X-doc/html is a symlink to python3.X/html: read each file once
    for path in sorted(root.glob("usr/share/doc/python3*/html/_sources/**/*.rst.txt")):
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield text


_CHAPTER_REF = re.compile(r"^Chapter\s\d+\.\s", re.M)  # the spaces are U+00A0 in this file


def _debian_reference(root: Path) -> Iterator[str]:
    for path in sorted(root.glob("usr/share/debian-reference/debian-reference.en.txt.gz")):
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        starts = [m.start() for m in _CHAPTER_REF.finditer(text)]
        if not starts:
            yield text.strip()
            continue
        for a, b in zip(starts, starts[1:] + [len(text)], strict=True):
            chunk = text[a:b].strip()
            if chunk:
                yield chunk


_MAN_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_MAN_ESCAPES = [
    (re.compile(r"\\\(em|\\\[em\]"), "—"),
    (re.compile(r"\\\(en|\\\[en\]"), "–"),
    (re.compile(r"\\\(aq|\\\[aq\]"), "'"),
    (re.compile(r"\\\(dq|\\\[dq\]"), '"'),
    (re.compile(r"\\\(bu|\\\[bu\]"), "•"),
    (re.compile(r"\\\(co|\\\[co\]"), "©"),
    (re.compile(r"\\\((..)|\\\[([^\]]*)\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&|^%:]"), ""),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\s[-+]?\d"), ""),
    (re.compile(r"\\c"), ""),
]


def man_to_text(source: str) -> str:
    """Plain text from groff man-page markup (headings kept, macros and font escapes removed)."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            macro = macro.strip()
            rest = rest.strip()
            if macro in ("SH", "SS"):
                out += ["", rest.strip('"').upper() if macro == "SH" else rest.strip('"'), ""]
            elif macro in ("PP", "P", "LP", "TP", "IP", "HP", "sp", "br", "RS", "RE", "EX", "EE", "in", "ti"):
                out.append("")
                if macro == "IP" and rest:
                    out.append(rest.split('"')[1] if rest.startswith('"') and rest.count('"') >= 2 else rest.split()[0])
            elif macro in ("B", "I", "SM", "SB"):
                out.append(rest.replace('"', ""))
            elif macro in ("BR", "RB", "IR", "RI", "BI", "IB"):
                words = re.findall(r'"[^"]*"|\S+', rest)
                out.append("".join(w.strip('"') for w in words))
            elif macro in ("UR", "MT"):
                out.append(rest)
            continue
        out.append(line)
    text = "\n".join(out)
    text = _MAN_FONT.sub("", text)
    for pattern, repl in _MAN_ESCAPES:
        text = pattern.sub(repl, text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _manpages(root: Path) -> Iterator[str]:
    for path in sorted(root.glob("usr/share/man/man[2-7]/*.gz")):
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        if raw.lstrip().startswith(".so "):  # a link to another page
            continue
        text = man_to_text(raw)
        if len(text) > 200:
            yield text


def _stdlib_topics() -> Iterator[str]:
    from pydoc_data.topics import topics  # lazy: 750 KB of help texts, read only by this fallback

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield text


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_docstrings() -> Iterator[str]:
    """One document per standard-library module (parsing them all takes seconds: cached, keyed by Python's version)."""
    return _cached(f"stdlib-docstrings-{platform.python_version()}", _parse_stdlib_docstrings)


def _cached(key: str, parse: Callable[[], Iterator[str]]) -> Iterator[str]:
    """A source's documents, from $KDTOOL_HOME/cache/{key}.jsonl.gz once a first full pass has written it.

    Why: the embedded corpus is parsed whole before cache-acts' first forward (its document
    shuffle buffer is larger than the corpus): 3.9 s of CPU per run for the Debian sources
    (R's lazy-load database, groff, reST), against ~0.4 s to read the cache back. The key holds a
    fingerprint of the files and of the parsing code. An unwritable home just skips the cache.
    """
    cache = kdtool_home() / "cache" / f"{key}.jsonl.gz"
    if cache.is_file():
        with gzip.open(cache, "rt", encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)
        return
    docs: list[str] = []
    for doc in parse():
        docs.append(doc)
        yield doc
    try:  # reached only when the consumer read every document
        with atomic_path(cache) as tmp, gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as fh:
            fh.writelines(json.dumps(d) + "\n" for d in docs)
    except OSError:
        pass


def _parse_stdlib_docstrings() -> Iterator[str]:
    """Module docstring, then each class/function docstring, read with ast (modules are never imported)."""
    root = stdlib_dir()
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo")
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in skip or part.startswith("test_") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        parts: list[str] = []
        module_doc = ast.get_docstring(tree)
        if module_doc:
            parts.append(module_doc)
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    kind = "class" if isinstance(node, ast.ClassDef) else "def"
                    parts.append(f"{kind} {node.name}:\n{doc}")
        if parts:
            name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            yield f"Module {name}\n\n" + "\n\n".join(parts)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _size(paths: list[Path]) -> int:
    """Bytes in the distinct files among `paths` (a link and its target count once).

    Identified by (device, inode) from one stat each: Path.resolve() walked every path component
    (49K lstat calls for the man pages, half a second on each run of cache-acts).
    """
    seen: dict[tuple[int, int], int] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def _fingerprint(name: str, files: list[Path]) -> str:
    """What a parsed source depends on: its files (path, size, mtime) and the code that parses them."""
    h = hashlib.blake2b(digest_size=8)
    h.update(name.encode())
    for module in (__file__, rdata.__file__):
        h.update(Path(module).read_bytes())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cached_source(name: str, files: list[Path], parse, root: Path) -> Callable[[], Iterator[str]]:
    """() -> the source's documents, through the parsed-documents cache (`_cached`)."""
    return lambda: _cached(f"{name}-{_fingerprint(name, files)}", lambda: parse(root))


def _debian_sources(home: Path) -> list[tuple[str, Callable[[], Iterator[str]], int]]:
    found = []
    for name, package_glob, file_glob, fn in (
        ("austen", "r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb", _austen),
        ("python-docs", "python3*-doc", "usr/share/doc/python3*/html/_sources/**/*.rst.txt", _python_docs),
        (
            "debian-reference",
            "debian-reference-en",
            "usr/share/debian-reference/debian-reference.en.txt.gz",
            _debian_reference,
        ),
        ("manpages", "manpages", "usr/share/man/man[2-7]/*.gz", _manpages),
    ):
        roots = sorted((p for p in home.glob(package_glob) if (p / "usr").is_dir()), key=lambda p: _natural(p.name))
        if not roots:
            continue
        root = roots[-1]  # the newest version if several were fetched
        files = sorted(root.glob(file_glob))
        if not files:
            continue
        # Size estimates in characters of text: Rdata is ~3x compressed, gzip'ed text ~2.8x, man ~2x.
        factor = {"austen": 2.8, "debian-reference": 2.8, "manpages": 1.8}.get(name, 1.0)
        found.append((name, _cached_source(name, files, fn, root), int(_size(files) * factor)))
    return found


def sources(home: str | os.PathLike | None = None) -> list[tuple[str, Callable[[], Iterator[str]], int]]:
    """[(name, () -> iterator of documents, size estimate in characters)] for every source present."""
    home = Path(home) if home is not None else corpus_home()
    found = _debian_sources(home) if home.is_dir() else []
    topics_size = sum(len(v) for v in __import__("pydoc_data.topics", fromlist=["topics"]).topics.values())
    found.append(("stdlib-topics", _stdlib_topics, topics_size))
    # Docstrings are roughly a fifth of the standard library's source text.
    found.append(("stdlib-docstrings", _stdlib_docstrings, int(_size(list(stdlib_dir().glob("*.py"))) * 0.35)))
    return found


def source_names(home: str | os.PathLike | None = None) -> list[str]:
    return [name for name, _, _ in sources(home)]


def embedded_corpus(
    home: str | os.PathLike | None = None, *, only: list[str] | None = None
) -> Iterator[tuple[str, str]]:
    """(source, text) documents from every source present, interleaved by size (deterministic).

    A source with estimated size S_k advances when its emitted characters / S_k is the smallest,
    so a prefix of the stream is a near-proportional mixture of all sources.
    """
    present = sources(home)
    if only is not None:
        unknown = sorted(set(only) - {name for name, _, _ in present})
        if unknown:
            raise BadInput(f"embedded corpus: source(s) {unknown} not present (have: {[n for n, _, _ in present]})")
        present = [s for s in present if s[0] in only]
    heap: list[tuple[float, int, str, Iterator[str], int]] = []
    for order, (name, make, size) in enumerate(present):
        heap.append((0.0, order, name, make(), max(size, 1)))
    heapq.heapify(heap)
    emitted = {name: 0 for _, _, name, _, _ in heap}
    while heap:
        _, order, name, it, size = heapq.heappop(heap)
        text = next(it, None)
        if text is None:
            continue
        emitted[name] += len(text)
        heapq.heappush(heap, (emitted[name] / size, order, name, it, size))
        yield name, text


def summary(home: str | os.PathLike | None = None) -> dict[str, dict[str, int]]:
    """{source: {"documents", "characters"}} over the whole embedded corpus (scripts/fetch-corpus prints it)."""
    counts: dict[str, dict[str, int]] = {}
    for name, text in embedded_corpus(home):
        c = counts.setdefault(name, {"documents": 0, "characters": 0})
        c["documents"] += 1
        c["characters"] += len(text)
    return counts
