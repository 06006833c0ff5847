"""The default probe concepts: built from (miniature copies of) the real Debian sources, labels from the
source's own marks, giveaways removed, balanced and deterministic; plus the R and .deb readers they use."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pytest

from kdtool import formats
from kdtool.errors import BadInput, RuntimeFailure
from kdtool.probe import concepts as cs
from kdtool.probe import job

# ------------------------------------------------------------------ a tiny R serializer (XDR, version 2)
from kdtool.text import debian as debsource
from kdtool.text import rdata


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _charsxp(s: str) -> bytes:
    b = s.encode()
    return _i(0x00040009) + _i(len(b)) + b  # CHARSXP, UTF-8 flag


def _strsxp(values: list[str]) -> bytes:
    return _i(16) + _i(len(values)) + b"".join(_charsxp(v) for v in values)


def _names_attr(names: list[str]) -> bytes:
    return _i(2 | (1 << 10)) + _i(1) + _charsxp("names") + _strsxp(names) + _i(254)  # LISTSXP(tag) ... NILVALUE


def _named_list(items: dict[str, bytes]) -> bytes:
    return _i(19 | (1 << 9)) + _i(len(items)) + b"".join(items.values()) + _names_attr(list(items))


def _serialize(body: bytes) -> bytes:
    return b"X\n" + _i(2) + _i(0x040201) + _i(0x020300) + body


def write_rdata(stem: Path, objects: dict[str, list[str]]) -> None:
    """An R lazy-load DB (Rdata.rdx + Rdata.rdb) holding character vectors, as R's data packages store them."""
    rdb, offsets = b"", {}
    for name, lines in objects.items():
        raw = _serialize(_strsxp(lines))
        block = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets[name] = (len(rdb), len(block))
        rdb += block
    variables = {n: _i(13) + _i(2) + _i(o) + _i(ln) for n, (o, ln) in offsets.items()}
    index = _named_list(
        {"variables": _named_list(variables), "references": _i(19) + _i(0), "compressed": _i(10) + _i(1) + _i(1)}
    )
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".rdb").write_bytes(rdb)
    stem.with_suffix(".rdx").write_bytes(gzip.compress(_serialize(index)))


# ------------------------------------------------------------------ miniature source packages

AUSTEN = [
    "EMMA",
    "",
    "CHAPTER I",
    "",
    "Emma Woodhouse, handsome, clever, and rich, had lived nearly twenty-one years in the world.",
    "",
    '"Do you think Mr. Knightley will come to dinner tonight?" asked Harriet.',
    "",
    '"Shall we walk to Highbury this morning after breakfast?"',
    "",
    "She was the youngest of the two daughters of a most affectionate father.",
    "",
    "CHAPTER II",
    "",
    '"Why would anybody leave such a pleasant house so early?"',
    "",
    "Mr. Weston was a native of Highbury, and born of a respectable family.",
    "",
    "What a lovely day it is for a long walk!",
    "",
]

MAN_EN = """.\\" comment
.TH PIPE 7
.SH NAME
pipe \\- overview of pipes and FIFOs
.SH DESCRIPTION
Pipes and FIFOs provide a unidirectional interprocess
communication channel with a \\fIread end\\fP and a write end.
.PP
Data written to the write end of a pipe can be read from the read end of the pipe.
.EX
int fd[2]; pipe(fd);
.EE
.PP
Before Linux 2.6.11, the capacity of a pipe was the same as the system page size.
"""

MAN_FR = """.TH PIPE 7
.SH NOM
pipe \\- Exposé général sur les tubes et les FIFO
.SH DESCRIPTION
Les tubes et les FIFO fournissent un canal de communication
interprocessus unidirectionnel avec une \\fIentrée\\fP et une sortie.
.PP
Les données écrites à l'entrée du tube peuvent être lues à sa sortie\\ ; c'est tout.
.PP
Before Linux 2.6.11, the capacity of a pipe was the same as the system page size.
.PP
Since Linux 2.6.35 the default pipe capacity is sixteen pages and it can be queried.
"""

REST = """Tutorial
========

Python is an easy to learn, powerful programming language with efficient data structures.

The :func:`print` function writes the value of the argument(s) it is given, like this::

   >>> print('Hello')
   Hello

It has many other uses, described in the documentation of ``print`` and :ref:`friends <tut>`.

A doctest block follows a paragraph that explains what happens below:

>>> 2 + 2
4

Here is a shell example that should be highlighted as code by the documentation system:

.. code-block:: shell
   :linenos:

   python -m venv env

``keyword``
   Definition lists are not plain prose paragraphs and should never be used by the builder.

Plain prose again, with no code block following it anywhere in the document at all.
"""


def _synset(pos: str, offset: str, word: str, pointers: list[tuple[str, str, str]], gloss: str) -> str:
    ptrs = " ".join(f"{sym} {off} {p} 0000" for sym, off, p in pointers)
    return f"{offset} 00 {pos} 01 {word} 0 {len(pointers):03d} {ptrs} | {gloss}  \n"


def write_wordnet(root: Path) -> None:
    d = root / "usr/share/wordnet"
    d.mkdir(parents=True)
    nouns = [
        _synset("n", "00523513", "sport", [("~", "00468480", "n")], "an active diversion requiring physical exertion"),
        _synset(
            "n", "00468480", "football", [("@", "00523513", "n")], "any of various games played with a ball kicked"
        ),
        _synset(
            "n", "00000101", "touchdown", [(";c", "00468480", "n")], "(football) a score made by carrying the ball"
        ),
        _synset("n", "08441203", "law", [], "the collection of rules imposed by authority in a society"),
        _synset(
            "n", "00000202", "plaintiff", [(";c", "08441203", "n")], "(law) a person who brings an action in court"
        ),
        _synset("n", "06045562", "medical_science", [], "the science of dealing with health and disease"),
        _synset(
            "n", "00000303", "aspirin", [(";c", "06045562", "n")], "(medicine) a drug that relieves pain and fever"
        ),
    ]
    for k in range(12):
        nouns.append(_synset("n", f"0100{k:04d}", f"thing{k}", [], f"an ordinary household object number {k} of many"))
    (d / "data.noun").write_text("  1 This software and database is being provided\n" + "".join(nouns))
    verbs = [_synset("v", "00000404", "dribble", [(";c", "00523513", "n")], "(sports) move the ball by bouncing it")]
    verbs += [
        _synset("v", f"0200{k:04d}", f"walk{k}", [], f"move along on foot at ordinary pace {k}") for k in range(6)
    ]
    (d / "data.verb").write_text("".join(verbs))
    (d / "data.adj").write_text("")
    (d / "data.adv").write_text("")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    write_rdata(root / "r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata", {"emma": AUSTEN})
    for pkg, sub, text in (
        ("manpages", "usr/share/man/man7", MAN_EN),
        ("manpages-fr", "usr/share/man/fr/man7", MAN_FR),
    ):
        (root / pkg / sub).mkdir(parents=True)
        (root / pkg / sub / "pipe.7.gz").write_bytes(gzip.compress(text.encode()))
    docs = root / "python3.11-doc/usr/share/doc/python3.11/html/_sources/tutorial"
    docs.mkdir(parents=True)
    (docs / "intro.rst.txt").write_text(REST)
    write_wordnet(root / "wordnet-base")
    return root


def _rows(cols, concept):
    return [
        (t, lab, it)
        for t, c, lab, it in zip(cols["text"], cols["concept"], cols["label"], cols["item"], strict=True)
        if c == concept
    ]


# ------------------------------------------------------------------ tests


def test_rdata_reads_lazyload_db(tmp_path):
    write_rdata(tmp_path / "Rdata", {"a": ["x", "y"], "b": ["é", ""]})
    assert rdata.read_lazyload(tmp_path / "Rdata") == {"a": ["x", "y"], "b": ["é", ""]}
    (tmp_path / "Rdata.rdx").write_bytes(b"junk")
    with pytest.raises(Exception, match="Rdata.rdx"):
        rdata.read_lazyload(tmp_path / "Rdata")


def test_questions_from_austen(sources):
    cands = cs.question_candidates([sources])
    pos = {t for t, _, _ in cands.pos}
    neg = {t for t, _, _ in cands.neg}
    assert "Do you think Mr. Knightley will come to dinner tonight" not in pos  # ends in '.': a statement with a '?'
    assert "Shall we walk to Highbury this morning after breakfast" in pos
    assert "Why would anybody leave such a pleasant house so early" in pos
    assert "Mr. Weston was a native of Highbury, and born of a respectable family" in neg  # 'Mr.' is no boundary
    assert not any("?" in t or '"' in t or t.endswith(".") for t in pos | neg)  # giveaways stripped
    assert not any("lovely day" in t for t in pos | neg)  # exclamations are neither
    assert {it for _, _, it in cands.pos} == {"austen:emma:ch1", "austen:emma:ch2"}


def test_french_from_parallel_manpages(sources):
    cands = cs.french_candidates([sources], min_words=5)
    pos = [t for t, _, _ in cands.pos]
    neg = [t for t, _, _ in cands.neg]
    assert any(t.startswith("Les tubes et les FIFO fournissent") and "entrée et une sortie" in t for t in pos)
    assert any("sortie ; c'est tout" in t for t in pos)  # '\ ' escape -> space
    assert not any("Before Linux" in t or "Since Linux" in t for t in pos)  # untranslated paragraphs dropped
    assert any(t.startswith("Pipes and FIFOs provide") for t in neg)
    assert not any("\\f" in t or "pipe(fd)" in t for t in pos + neg)  # roff escapes and .EX examples removed
    assert {s for _, s, _ in cands.pos} == {"manpages-fr"} and {it for _, _, it in cands.neg} == {
        "manpages:man7/pipe.7"
    }


def test_code_from_rest(sources):
    cands = cs.code_candidates([sources], min_words=5)
    pos = [t for t, _, _ in cands.pos]
    assert len(pos) == 3  # literal block, doctest block, code-block directive
    assert pos[0].startswith("The print function writes") and pos[0].splitlines()[0].endswith("like this:")
    assert ">>> print('Hello')" in pos[0]
    assert pos[2].endswith("python -m venv env") and ":linenos:" not in pos[2]
    assert not any("::" in t or ":func:" in t or ".. code-block" in t for t in pos)
    neg = [t for t, _, _ in cands.neg]
    assert "Python is an easy to learn, powerful programming language with efficient data structures." in neg
    assert any(t.startswith("It has many other uses") and "print and friends" in t for t in neg)  # roles -> text
    assert not any("Definition lists" in t for t in neg)
    assert not any(t.endswith(":") for t in neg)


def test_topic_domains_from_wordnet(sources):
    wn = cs.read_wordnet(sources / "wordnet-base/usr/share/wordnet")
    sports = cs.wordnet_candidates("sports", [sources], wordnet=wn)
    texts = {t for t, _, _ in sports.pos}
    # topic domain under the root (football is a hyponym of sport), the subtree itself, and a verb
    assert "a score made by carrying the ball" in texts  # '(football)' tag dropped
    assert "any of various games played with a ball kicked" in texts
    assert "move the ball by bouncing it" in texts
    assert not any(t.startswith("(") for t, _, _ in sports.pos + sports.neg)
    assert "a person who brings an action in court" in {t for t, _, _ in sports.neg}
    legal = cs.wordnet_candidates("legal", [sources], wordnet=wn)
    assert {it for _, _, it in legal.pos} == {"wordnet:n00000202", "wordnet:n08441203"}


def test_build_balanced_deterministic_and_matched(sources):
    cols, report = cs.build([sources], per_class=2, seed=0)
    counts = Counter(zip(cols["concept"], cols["label"], strict=True))
    for concept in cs.CONCEPTS:
        assert counts[(concept, 0)] == counts[(concept, 1)] == report[concept]["per_class"] == 2, concept
    again, _ = cs.build([sources], per_class=2, seed=0)
    assert again == cols
    other = [cs.build([sources], per_class=2, seed=s)[0]["text"] for s in (1, 2, 3)]
    assert any(o != cols["text"] for o in other)
    sports = _rows(cols, "sports")
    pos_kind = sorted(it.split(":")[1][0] for _, lab, it in sports if lab == 1)
    neg_kind = sorted(it.split(":")[1][0] for _, lab, it in sports if lab == 0)
    assert pos_kind == neg_kind  # negatives follow the positives' part of speech
    assert report["french"]["licences"]["manpages-fr"].startswith("French")


def test_balance_matches_length():
    pos = [(" ".join(["w"] * 7) + f" p{i}", "s", f"p{i}") for i in range(20)]
    neg = [(" ".join(["w"] * (7 if i < 10 else 40)) + f" {i}", "s", f"n{i}") for i in range(200)]
    rows, info = cs.balance(cs.Candidates(pos=pos, neg=neg), per_class=10, seed=0, concept="x")
    assert info["per_class"] == 10
    assert all(len(t.split()) == 8 for t, _, _, lab in rows if lab == 0)  # drawn from the short negatives


def test_missing_package_is_reported_not_fatal(sources, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "wordnet-base").symlink_to(sources / "wordnet-base")
    cols, report = cs.build([tmp_path / "nowhere", partial], per_class=3)
    assert set(cols["concept"]) == {"sports", "legal", "medical"}
    assert "r-cran-janeaustenr not found" in report["question"]["error"]
    assert "fetch-concept-sources" in report["code"]["error"]
    with pytest.raises(Exception, match="--concepts"):
        cs.build([partial], concepts=("sport",))


def test_cli_build_concepts(cli, sources, tmp_path):
    out = tmp_path / "concepts.parquet"
    r = cli("probe", "build-concepts", "--sources", sources, "-o", out, "--per-class", "2")
    assert r.exit_code == 0, r.stderr
    cols = formats.read_table(out, required=("text", "concept", "label", "source", "item"))
    assert set(cols["concept"]) == set(cs.CONCEPTS) and len(cols["text"]) == 24
    meta = formats.parquet_metadata(out)
    assert meta["kind"] == "kdtool.concepts" and meta["summary"]["concepts"]["question"]["per_class"] == 2
    jsonl = tmp_path / "c.jsonl"
    r = cli("probe", "build-concepts", "--sources", sources, "-o", jsonl, "--per-class", "2", "--concepts", "code")
    assert r.exit_code == 0
    assert formats.read_table(jsonl)["text"].tolist() == [
        t for t, c in zip(cols["text"], cols["concept"], strict=True) if c == "code"
    ]
    assert (tmp_path / "c.jsonl.provenance.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("probe", "build-concepts", "--sources", empty, "-o", tmp_path / "x.parquet")
    assert r.exit_code == 1
    assert "not built" in r.stderr and "no concept could be built" in r.stderr
    assert not (tmp_path / "x.parquet").exists()


def _old_text_table(path: Path, columns: dict[str, list]) -> str:
    """What build-concepts wrote for .csv/.jsonl before formats.table_text (the bytes must not change)."""
    import csv
    import json

    names = list(columns)
    rows = [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    if path.suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["concepts.csv", "concepts.jsonl"])
def test_build_concepts_file_text_formats_keep_their_bytes(sources, tmp_path, name):
    out = tmp_path / name
    events = []
    columns, report = job.build_concepts_file(
        out, sources=sources, per_class=3, seed=1, provenance=lambda **kw: {"test": kw}, callback=events.append
    )
    assert any("\n" in t or '"' in t or "," in t for t in columns["text"])  # quoting is exercised
    assert any(not t.isascii() for t in columns["text"])  # so is ensure_ascii=False (French)
    assert out.read_text() == _old_text_table(out, columns)
    side = formats.read_json(tmp_path / (name + ".provenance.json"))
    assert side["kind"] == "kdtool.concepts" and side["summary"]["concepts"] == report
    assert side["provenance"]["test"]["config"]["per_class"] == 3
    assert [e["concept"] for e in events] == list(cs.CONCEPTS)
    assert all(e["event"] == "concept" and e["info"] == report[e["concept"]] for e in events)


def test_build_concepts_file_refuses_bad_options(sources, tmp_path):
    with pytest.raises(BadInput, match="use .parquet, .jsonl or .csv"):
        job.build_concepts_file(tmp_path / "c.txt", sources=sources)
    with pytest.raises(BadInput, match="--max-chars"):
        job.build_concepts_file(tmp_path / "c.csv", sources=sources, max_chars=10)
    with pytest.raises(BadInput, match="no such folder"):
        job.build_concepts_file(tmp_path / "c.csv", sources=tmp_path / "nope")
    with pytest.raises(RuntimeFailure, match="no concept could be built"):
        job.build_concepts_file(tmp_path / "c.csv", sources=tmp_path)
    assert not (tmp_path / "c.csv").exists()


def _deb(tmp_path: Path) -> Path:
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:gz") as tar:
        data = b"hello\n"
        info = tarfile.TarInfo("./usr/share/doc/pkg/README")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", b""), ("data.tar.gz", tar_buf.getvalue())]
    out = b"!<arch>\n"
    for name, body in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    path = tmp_path / "pkg_1.0_all.deb"
    path.write_bytes(out)
    return path


def test_extract_deb(tmp_path):
    dest = debsource.extract_deb(_deb(tmp_path), tmp_path / "sources" / "pkg")
    assert (dest / "usr/share/doc/pkg/README").read_text() == "hello\n"
    assert debsource.package_dir("pkg", tmp_path / "sources") == dest
    (tmp_path / "bad.deb").write_bytes(b"not a deb")
    with pytest.raises(Exception, match="bad.deb"):
        debsource.extract_deb(tmp_path / "bad.deb", tmp_path / "x")


@pytest.mark.slow
def test_real_sources_if_fetched():
    """With the real packages fetched (scripts/fetch-concept-sources), all six concepts build at full size."""
    home = debsource.kdtool_home()
    roots = [home / "sources", home / "corpus"]
    try:
        for pkg in ("r-cran-janeaustenr", "manpages", "manpages-fr", "python3*-doc", "wordnet-base"):
            cs.find_package(pkg, roots)
    except cs.SourceMissing as exc:
        pytest.skip(str(exc))
    cols, report = cs.build(roots, per_class=500)
    assert all(report[c]["per_class"] == 500 for c in cs.CONCEPTS), report
