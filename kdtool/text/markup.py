"""Plain text out of the formats the concept sources come in: prose sentences, roff man pages,
reStructuredText documents and the WordNet database (wndb(5WN)). No labels here: kdtool/probe/concepts.py
decides what each piece of text is an example of.
"""

from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from kdtool.errors import BadInput

# ---------------------------------------------------------------- prose sentences
_ABBREV = {"Mr", "Mrs", "Dr", "St", "Messrs", "Esq", "Col", "Capt", "Rev", "Sir", "Mme", "Gen", "Lt"}
_BOUNDARY = re.compile(r"([.?!])([\"'\u201d\u2019]*)\s+(?=[\"'\u201c\u2018]?[A-Z])")


def split_sentences(paragraph: str) -> list[str]:
    """Split at . ? ! (plus closing quotes) before a capital, keeping abbreviations like 'Mr.' whole."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(paragraph):
        before = paragraph[start : m.start()].split()
        if m.group(1) == "." and before and before[-1].strip("\"'") in _ABBREV:
            continue
        out.append(paragraph[start : m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


# ---------------------------------------------------------------- roff (man pages)
_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string interpolation
    (re.compile(r"\\(\(em|\[em\])"), "\u2014"),
    (re.compile(r"\\(\(en|\[en\])"), "\u2013"),
    (re.compile(r"\\(\((hy|mi)|\[(hy|mi)\])"), "-"),
    (re.compile(r"\\(\((aq|cq|oq)|\[(aq|cq|oq)\])"), "'"),
    (re.compile(r"\\(\((dq|lq|rq)|\[(dq|lq|rq)\])"), '"'),
    (re.compile(r"\\\(Fo"), "\u00ab"),
    (re.compile(r"\\\(Fc"), "\u00bb"),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[ ~0|^]"), " "),
    (re.compile(r"\\[&:c%]"), ""),
    (re.compile(r"\\e"), "\\\\"),
]
_ROFF_TEXT_MACROS = {"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB"}


def roff_paragraphs(source: str) -> list[str]:
    """Prose paragraphs of a man page: macro lines end a paragraph, examples (.EX/.nf) are skipped."""
    paras, cur, literal, skip_next = [], [], False, False
    for raw in source.splitlines():
        if raw.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if raw.startswith((".", "'")):
            parts = raw[1:].split(None, 1)
            macro = parts[0] if parts else ""
            if macro in ("EX", "nf"):
                literal = True
            elif macro in ("EE", "fi"):
                literal = False
            if macro in _ROFF_TEXT_MACROS and not literal:
                args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', parts[1] if len(parts) > 1 else "")]
                # .BR ls (1): alternating fonts join their arguments with no space ("ls(1)")
                cur.append(("" if len(macro) == 2 and macro not in ("SM", "SB") else " ").join(args))
                continue
            if cur:
                paras.append(" ".join(cur))
                cur = []
            skip_next = macro == "TP"  # the next line is the tag (an option or a name), not prose
            continue
        if literal:
            continue
        if skip_next:
            skip_next = False
            continue
        cur.append(raw)
    if cur:
        paras.append(" ".join(cur))
    out = []
    for p in paras:
        for pattern, repl in _ROFF_ESCAPES:
            p = pattern.sub(repl, p)
        out.append(re.sub(r"\s+", " ", p).strip())
    return [p for p in out if p]


# ---------------------------------------------------------------- reStructuredText
_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_CODE_DIRECTIVES = ("code-block", "sourcecode", "code", "testcode", "doctest", "highlight-python")
_UNDERLINE = re.compile(r"^([=\-~^*#+`'\".:_])\1{2,}\s*$")
_LIST = re.compile(r"^(\s*([*+-]|\d+[.)]|#\.|\(\w\))\s|\s*[+|=]-*[+|=])")


def _role_text(m: re.Match) -> str:
    inner = m.group(1)
    if "<" in inner and inner.endswith(">"):
        inner = inner[: inner.rfind("<")].strip()
    return inner.lstrip("~!")


def rest_inline(text: str) -> str:
    """reST inline markup to plain text: roles, ``literals``, `links`_, *emphasis*, footnote refs."""
    text = _ROLE.sub(_role_text, text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`<]+?)(\s*<[^>]*>)?`_{1,2}", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)\*([^*\s][^*]*)\*", r"\1", text)
    text = re.sub(r"\s*\[(#\w*|\d+)\]_", "", text)
    return re.sub(r"\s+", " ", text).strip()


def _blocks(lines: list[str]) -> list[tuple[int, list[str]]]:
    """Maximal runs of non-blank lines with the indentation of their first line."""
    out, cur = [], []
    for line in [*lines, ""]:
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            out.append((len(cur[0]) - len(cur[0].lstrip()), cur))
            cur = []
    return out


def rest_examples(source: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(introducing paragraph, code) pairs and plain prose paragraphs of one top-level reST document."""
    blocks = _blocks(source.splitlines())
    with_code, prose = [], []
    i = 0
    while i < len(blocks):
        indent, lines = blocks[i]
        first = lines[0].strip()
        is_para = (
            indent == 0
            and all(not ln[:1].isspace() for ln in lines)  # a definition list indents its second line
            and not first.startswith(("..", ">>>", ":"))
            and not any(_UNDERLINE.match(ln) for ln in lines)
            and not _LIST.match(lines[0])
        )
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        code, j = None, i + 1
        if is_para and lines[-1].endswith("::") and nxt and nxt[0] > 0:  # literal block
            code_blocks = []
            while j < len(blocks) and blocks[j][0] > 0:
                code_blocks.append(blocks[j][1])
                j += 1
            code = code_blocks
        elif is_para and nxt and nxt[0] == 0:
            nfirst = nxt[1][0].strip()
            if nfirst.startswith(">>>"):  # doctest block
                code, j = [nxt[1]], i + 2
            elif nfirst.startswith(".. ") and nfirst[3:].split("::")[0].strip() in _CODE_DIRECTIVES:
                body = [ln for ln in nxt[1][1:] if not ln.strip().startswith(":")]  # directive options
                code_blocks = [body] if body else []
                j = i + 2
                while j < len(blocks) and blocks[j][0] > 0:
                    code_blocks.append(blocks[j][1])
                    j += 1
                code = code_blocks or None
        if is_para:
            text = " ".join(ln.strip() for ln in lines)
            if code:
                # reST: 'Example::' renders as 'Example:'; 'Example ::' and a lone '::' render as nothing
                intro = text[:-2].rstrip() if text.endswith(" ::") or text == "::" else text.removesuffix(":")
                intro = rest_inline(intro)
                body = textwrap.dedent("\n\n".join("\n".join(b) for b in code)).strip("\n")
                with_code.append((intro, body))
                i = j
                continue
            if not text.endswith(":"):  # a paragraph ending in ':' introduces something: not plain prose
                prose.append(rest_inline(text))
        i += 1
    return with_code, prose


# ---------------------------------------------------------------- WordNet
_POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


@dataclass
class WordNet:
    gloss: dict[str, str]  # "n08441203" -> gloss text
    hyponyms: dict[str, list[str]]
    domains: dict[str, list[str]]  # synset -> its topic-domain synsets (';c')

    def subtree(self, root: str) -> set[str]:
        out, stack = {root}, [root]
        while stack:
            for h in self.hyponyms.get(stack.pop(), ()):
                if h not in out:
                    out.add(h)
                    stack.append(h)
        return out


def read_wordnet(dict_dir: Path) -> WordNet:
    """Parse WordNet's data.{noun,verb,adj,adv} (format: wndb(5WN)) into glosses, hyponyms and topic domains."""
    wn = WordNet({}, defaultdict(list), defaultdict(list))
    for pos, name in _POS_FILES.items():
        path = dict_dir / f"data.{name}"
        if not path.exists():
            raise BadInput(f"{path} not found (is wordnet-base unpacked completely?)")
        for line in path.open(encoding="latin-1"):
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            f = head.split()
            key = pos + f[0]
            n_words = int(f[3], 16)
            k = 4 + 2 * n_words
            n_ptrs = int(f[k])
            k += 1
            for _ in range(n_ptrs):
                symbol, offset, tpos = f[k], f[k + 1], f[k + 2].replace("s", "a")
                k += 4
                if symbol in ("~", "~i"):
                    wn.hyponyms[key].append(tpos + offset)
                elif symbol == ";c":
                    wn.domains[key].append(tpos + offset)
            wn.gloss[key] = gloss.strip()
    return wn
