"""The default probe concepts: six binary labels built offline from real text (paper section 7.1).

The paper probes "is this a question / French / code / about sports / legal / medical" on The Pile.
We rebuild the same six from text that ships in Debian packages (fetched by
scripts/fetch-concept-sources into $KDTOOL_HOME/sources), with every label taken from how the
source itself marks the text, and the mark removed where a probe could key on it:

- question: Austen sentences ending in '?' vs in '.' (r-cran-janeaustenr); the final
  punctuation and all double quotes removed.
- french: paragraphs of manpages-fr vs the same pages in manpages; roff markup removed, French
  paragraphs left untranslated (identical to the English page, or mostly English function words)
  dropped.
- code: a python3.X-doc reST paragraph with the code block it introduces vs prose paragraphs
  with no code; '::', code-block directives and inline roles removed.
- sports / legal / medical: WordNet glosses whose topic domain lies under the concept's domain
  synset, or whose synset lies under one of its taxonomy roots, vs other glosses (wordnet-base);
  leading '(law)'-style tags removed.

Negatives are drawn to match the positives' length (and part of speech for WordNet).
Each example records `source` (package) and `item` (the source unit it came from: a chapter, a
man page, a doc page, a synset) so the control task (Hewitt & Liang 2019) can give every item one
fixed random label. Classes are balanced, up to `per_class` each, sampled deterministically from
`seed`. Details, licences and counts: docs/probe.md.
"""

from __future__ import annotations

import gzip
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from kdtool.errors import BadInput
from kdtool.text.markup import WordNet, read_wordnet, rest_examples, roff_paragraphs, split_sentences
from kdtool.text.rdata import read_lazyload

CONCEPTS = ("question", "french", "code", "sports", "legal", "medical")

#: Concept -> the Debian packages it needs (see kdtool.text.debian.CONCEPT_PACKAGES).
PACKAGES = {
    "question": ("r-cran-janeaustenr",),
    "french": ("manpages", "manpages-fr"),
    "code": ("python3*-doc",),  # the newest python3.X-doc found
    "sports": ("wordnet-base",),
    "legal": ("wordnet-base",),
    "medical": ("wordnet-base",),
}

#: WordNet 3.0 topic-domain roots: a synset is positive when its topic domain (';c' pointer) is one
#: of these synsets or a hyponym of one (e.g. glosses tagged 'baseball' count for sports).
WORDNET_DOMAINS = {
    "sports": ("n00523513",),  # sport, athletics
    "legal": ("n08441203",),  # law, jurisprudence (case law, legislation, canon law, ...)
    "medical": ("n06045562",),  # medical science (medicine, surgery, pathology, psychiatry, ...)
}
#: WordNet 3.0 taxonomy roots: a synset is also positive when it is itself a hyponym of one of these.
WORDNET_ROOTS = {
    "sports": (
        "n00523513",  # sport, athletics (football, tennis, golf, ...)
        "n09820263",  # athlete, jock
    ),
    "legal": (
        "n08441203",  # law, jurisprudence
        "n06479665",  # legal document, legal instrument
        "n10249950",  # lawyer, attorney
        "n08329453",  # court, tribunal, judicature
    ),
    "medical": (
        "n06045562",  # medical science
        "n14070360",  # disease
        "n14299637",  # symptom
        "n01024392",  # medical procedure
        "n00657604",  # medical care
        "n03740161",  # medicine, medication, drug
        "n10020890",  # doctor, physician
    ),
}
#: Subtrees taken out again: WordNet files the Old and New Testament under "will, testament" (a legal
#: document), which would make scripture (and every gloss in those topic domains) "legal text".
WORDNET_EXCLUDE = {"legal": ("n06449735", "n06453849")}

LICENCES = {
    "r-cran-janeaustenr": "Austen's novels: public domain; package MIT (Julia Silge)",
    "manpages": "Linux man-pages: Linux-man-pages-copyleft and others (see its copyright file)",
    "manpages-fr": "French translations of man-pages: GPL-3+",
    "python3.X-doc": "Python documentation: PSF License 2 (Python Software Foundation)",
    "wordnet-base": "WordNet 3.0 licence (Princeton University), permissive",
}


def licence(package: str) -> str:
    """The licence note for a source package (python3.X-doc for any Python version)."""
    return LICENCES.get(
        "python3.X-doc" if re.fullmatch(r"python3\.\d+-doc", package) else package, "see its copyright file"
    )


class SourceMissing(Exception):
    """A concept's source package is not under the sources folder (message says how to fetch it)."""


@dataclass
class Candidates:
    """Texts that could become examples of one concept, per class: (text, source, item)."""

    pos: list[tuple[str, str, str]] = field(default_factory=list)
    neg: list[tuple[str, str, str]] = field(default_factory=list)
    #: optional stratum per entry (e.g. part of speech); negatives are drawn to match the positives' mix
    pos_strata: list[str] | None = None
    neg_strata: list[str] | None = None


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_package(pattern: str, sources: list[Path]) -> Path:
    """The unpacked tree of a package in the first sources folder that has it (a glob such as
    'python3*-doc' picks the newest version)."""
    for base in sources:
        hits = sorted((p for p in base.glob(pattern) if (p / "usr").is_dir()), key=lambda p: _natural(p.name))
        if hits:
            return hits[-1]
    where = " or ".join(str(s) for s in sources)
    raise SourceMissing(f"package {pattern} not found under {where} (run scripts/fetch-concept-sources)")


def _clip(text: str, max_chars: int) -> str:
    """Cut at a word boundary so a text never exceeds max_chars."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def _words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------- question: Austen's sentences
_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+([IVXLC\d]+)\b")
_QUOTES = re.compile(r"[\"\u201c\u201d]")


def question_candidates(sources: list[Path], *, min_words: int = 5, max_words: int = 60, **_) -> Candidates:
    stem = find_package("r-cran-janeaustenr", sources) / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    books = read_lazyload(stem)
    cands = Candidates()
    for book in sorted(books):
        chapter, para = 0, []
        for line in [*books[book], ""]:
            if _CHAPTER.match(line or ""):
                chapter += 1
            if line and line.strip():
                para.append(line.strip())
                continue
            text = " ".join(para).replace("_", "")
            para = []
            if chapter == 0 or not text:
                continue
            for sent in split_sentences(text):
                core = sent.rstrip("\"'\u201d\u2019 ")
                if not core or core[-1] not in ".?" or "!" in core or not (min_words <= _words(core) <= max_words):
                    continue
                n_q = core.count("?")
                if core.endswith("?") and n_q == 1:
                    label = 1
                elif core.endswith(".") and n_q == 0:
                    label = 0
                else:
                    continue  # a question inside a statement (or vice versa): ambiguous label
                clean = re.sub(r"\s+", " ", _QUOTES.sub("", core[:-1])).strip()
                clean = clean.strip("'\u2018\u2019 ")
                entry = (clean, "r-cran-janeaustenr", f"austen:{book}:ch{chapter}")
                (cands.pos if label else cands.neg).append(entry)
    return cands


# ---------------------------------------------------------------- french: parallel man pages
def _man_pages(root: Path) -> dict[str, Path]:
    """{'man7/pipe.7': path} for real (non-link, non-.so) pages."""
    out = {}
    for path in sorted(root.glob("man*/*.gz")):
        if path.is_symlink():
            continue
        out[f"{path.parent.name}/{path.name[:-3]}"] = path
    return out


#: Function words used only to drop paragraphs that po4a left untranslated (not to label anything).
_EN_WORDS = frozenset("the is of and to in that this for are with be it by or as not on".split())
_FR_WORDS = frozenset("le la les de des est et une un du pour dans que sont au aux ne pas sur par".split())


def _mostly_english(text: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ]+", text.lower())
    return sum(w in _EN_WORDS for w in words) > sum(w in _FR_WORDS for w in words)


def french_candidates(sources: list[Path], *, min_words: int = 8, max_chars: int = 600, **_) -> Candidates:
    en_pages = _man_pages(find_package("manpages", sources) / "usr/share/man")
    fr_pages = _man_pages(find_package("manpages-fr", sources) / "usr/share/man/fr")
    cands = Candidates()
    for page in sorted(set(en_pages) & set(fr_pages)):  # the same pages in both languages
        en = roff_paragraphs(gzip.decompress(en_pages[page].read_bytes()).decode("utf-8", "replace"))
        fr = roff_paragraphs(gzip.decompress(fr_pages[page].read_bytes()).decode("utf-8", "replace"))
        en_set = set(en)
        for text in en:
            if _words(text) >= min_words:
                cands.neg.append((_clip(text, max_chars), "manpages", f"manpages:{page}"))
        for text in fr:
            # po4a leaves paragraphs it has no translation for in English (identical to the English page,
            # or from another man-pages version): those are not French text
            if _words(text) >= min_words and text not in en_set and not _mostly_english(text):
                cands.pos.append((_clip(text, max_chars), "manpages-fr", f"manpages-fr:{page}"))
    return cands


# ---------------------------------------------------------------- code: reST paragraphs and code blocks
def code_candidates(sources: list[Path], *, min_words: int = 8, max_chars: int = 600, **_) -> Candidates:
    pkg = find_package("python3*-doc", sources)
    roots = [p for p in sorted(pkg.glob("usr/share/doc/python3*/html/_sources")) if not p.parent.is_symlink()]
    if not roots:
        raise SourceMissing(f"{pkg}: no html/_sources folder (not a python3.X-doc package?)")
    root = roots[0]
    cands = Candidates()
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()[: -len(".txt")]
        with_code, prose = rest_examples(path.read_text(encoding="utf-8", errors="replace"))
        for intro, code in with_code:
            if len(intro) > max_chars // 2:  # keep the end, which leads into the code (no '…': a giveaway)
                intro = intro[-(max_chars // 2) :].split(" ", 1)[-1]
            room = max_chars - len(intro) - 2
            kept = []
            for line in code.splitlines():
                if sum(len(k) + 1 for k in kept) + len(line) > room:
                    break
                kept.append(line)
            if _words(intro) >= 3 and kept and any(k.strip() for k in kept):
                cands.pos.append((intro + "\n\n" + "\n".join(kept).rstrip(), pkg.name, f"python-doc:{rel}"))
        for text in prose:
            if _words(text) >= min_words:
                cands.neg.append((_clip(text, max_chars), pkg.name, f"python-doc:{rel}"))
    return cands


# ---------------------------------------------------------------- sports / legal / medical: WordNet glosses
_LEADING_TAGS = re.compile(r"^(\s*\([^()]*\)\s*)+")


def wordnet_candidates(
    concept: str, sources: list[Path], *, min_words: int = 4, max_chars: int = 600, wordnet: WordNet | None = None, **_
) -> Candidates:
    wn = wordnet or read_wordnet(find_package("wordnet-base", sources) / "usr/share/wordnet")
    excluded: set[str] = set()
    for root in WORDNET_EXCLUDE.get(concept, ()):
        excluded |= wn.subtree(root)
    domains: set[str] = set()
    for root in WORDNET_DOMAINS[concept]:
        domains |= wn.subtree(root) - excluded
    tree: set[str] = set()
    for root in WORDNET_ROOTS[concept]:
        tree |= wn.subtree(root) - excluded
    cands = Candidates(pos_strata=[], neg_strata=[])
    for key in sorted(wn.gloss):
        text = _clip(_LEADING_TAGS.sub("", wn.gloss[key]).strip(), max_chars)  # drop '(law)'-style tags
        if _words(text) < min_words:
            continue
        positive = key in tree or any(d in domains for d in wn.domains.get(key, ()))
        entry = (text, "wordnet-base", f"wordnet:{key}")
        if positive:
            cands.pos.append(entry)
            cands.pos_strata.append(key[0])
        else:
            cands.neg.append(entry)
            cands.neg_strata.append(key[0])
    return cands


# ---------------------------------------------------------------- sampling
#: word-count bins: negatives are drawn to match the positives' length distribution
_LENGTH_BINS = (6, 9, 13, 18, 25, 35, 50, 70, 100)


def _stratum(text: str, extra: str) -> str:
    words = _words(text)
    return f"{extra}:{sum(words >= b for b in _LENGTH_BINS)}"


def _dedupe(entries: list[tuple[str, str, str]], strata: list[str] | None, banned: set[str]):
    seen, out, out_strata = set(), [], []
    for i, e in enumerate(entries):
        if e[0] in seen or e[0] in banned:
            continue
        seen.add(e[0])
        out.append(e)
        out_strata.append(_stratum(e[0], strata[i] if strata else ""))
    return out, out_strata


def balance(cands: Candidates, per_class: int, seed: int, concept: str):
    """Up to per_class examples per class, the same number in each.

    Negatives are drawn stratum by stratum to match the positives' mix of length (word-count bins)
    and, where the builder gives one, part of speech: otherwise a probe could key on length alone
    (Austen's questions are shorter than her statements; doc paragraphs with code are longer).
    When a stratum runs short, the rest is filled at random from the remaining negatives."""
    overlap = {e[0] for e in cands.pos} & {e[0] for e in cands.neg}  # same text in both classes: unusable
    pos, pos_strata = _dedupe(cands.pos, cands.pos_strata, overlap)
    neg, neg_strata = _dedupe(cands.neg, cands.neg_strata, overlap)
    n = min(per_class, len(pos), len(neg))
    rng = random.Random(f"{seed}:{concept}")
    chosen_pos = rng.sample(range(len(pos)), n)
    want = Counter(pos_strata[i] for i in chosen_pos)
    by_stratum = defaultdict(list)
    for i, s in enumerate(neg_strata):
        by_stratum[s].append(i)
    chosen_neg = []
    for s in sorted(want):
        pool = by_stratum.get(s, [])
        chosen_neg += rng.sample(pool, min(want[s], len(pool)))
    rest = sorted(set(range(len(neg))) - set(chosen_neg))
    chosen_neg += rng.sample(rest, n - len(chosen_neg))
    rows = [(*pos[i], 1) for i in chosen_pos] + [(*neg[i], 0) for i in chosen_neg]
    rng.shuffle(rows)
    return rows, {"positives_available": len(pos), "negatives_available": len(neg), "per_class": n}


_BUILDERS = {
    "question": question_candidates,
    "french": french_candidates,
    "code": code_candidates,
}


def build(sources: str | Path | list, *, concepts=CONCEPTS, per_class: int = 1000, seed: int = 0, max_chars: int = 600):
    """Build the concept set. Returns (columns, report): columns text/concept/label/source/item;
    report[concept] = {'per_class', 'positives_available', ...} or {'error': why it could not be built}."""
    sources = [Path(s) for s in sources] if isinstance(sources, (list, tuple)) else [Path(sources)]
    unknown = [c for c in concepts if c not in CONCEPTS]
    if unknown:
        raise BadInput(f"--concepts: unknown concept(s) {', '.join(unknown)} (choose from {', '.join(CONCEPTS)})")
    if per_class < 2:
        raise BadInput("--per-class must be >= 2")
    columns: dict[str, list] = {"text": [], "concept": [], "label": [], "source": [], "item": []}
    report: dict[str, dict] = {}
    wordnet = None
    for concept in concepts:
        try:
            if concept in _BUILDERS:
                cands = _BUILDERS[concept](sources, max_chars=max_chars)
            else:
                if wordnet is None:
                    wordnet = read_wordnet(find_package("wordnet-base", sources) / "usr/share/wordnet")
                cands = wordnet_candidates(concept, sources, max_chars=max_chars, wordnet=wordnet)
        except SourceMissing as exc:
            report[concept] = {"error": str(exc)}
            continue
        rows, info = balance(cands, per_class, seed, concept)
        if info["per_class"] < 2:
            report[concept] = {
                "error": f"too few examples ({info['positives_available']} positive, "
                f"{info['negatives_available']} negative)",
                **info,
            }
            continue
        info["sources"] = sorted({r[1] for r in rows})
        info["licences"] = {pkg: licence(pkg) for pkg in info["sources"]}
        report[concept] = info
        for text, source, item, label in rows:
            columns["text"].append(text)
            columns["concept"].append(concept)
            columns["label"].append(label)
            columns["source"].append(source)
            columns["item"].append(item)
    return columns, report
