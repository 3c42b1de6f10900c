"""Offline WordNet for METEOR.

NLTK's METEOR needs WordNet synonyms, and ``nltk.download`` cannot reach its server here. Debian's
``wordnet-base`` package (WordNet 3.0, the same database NLTK ships) installs the dictionary files under
``/usr/share/wordnet`` but not the small ``lexnames`` index NLTK's reader insists on; that table is printed in
the package's own ``lexnames(5WN)`` man page, so we rebuild the file from there into a cache folder with
copies of the real data files. Nothing is hand-written: every byte comes from the Debian package.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import warnings
from pathlib import Path

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
DEBIAN_LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
# Syntactic category numbers of the lexnames file (wndb(5WN)): noun 1, verb 2, adjective 3, adverb 4.
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_LEXNAME_LINE = re.compile(r"^(\d\d)\s+((adj|adv|noun|verb)\.\w+)\s")


class WordNetUnavailable(RuntimeError):
    """WordNet data is not on this machine; METEOR cannot be computed."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("OMNICT_WORDNET_CACHE", Path.home() / ".cache" / "omnict" / "wordnet"))


def _lexnames_from_man_page(man_page: Path) -> str:
    lines = []
    for raw in gzip.open(man_page, "rt", encoding="utf-8", errors="replace"):
        match = _LEXNAME_LINE.match(raw)
        if match:
            lines.append(f"{match.group(1)}\t{match.group(2)}\t{_CATEGORY[match.group(3)]}")
    if len(lines) != 45:  # WordNet 3.0 has exactly 45 lexicographer files (00..44)
        raise WordNetUnavailable(f"could not read the 45 lexicographer names from {man_page} (got {len(lines)})")
    return "\n".join(lines) + "\n"


def prepare_wordnet_dir(cache_dir: Path | None = None, source: Path = DEBIAN_WORDNET_DIR,
                        man_page: Path = DEBIAN_LEXNAMES_MAN) -> Path:
    """Return a folder NLTK's ``WordNetCorpusReader`` can open, building it once from Debian's wordnet-base."""
    if not (source / "data.noun").exists():
        raise WordNetUnavailable(f"WordNet data missing at {source} (install the Debian package 'wordnet-base')")
    if not man_page.exists():
        raise WordNetUnavailable(f"lexnames table missing at {man_page} (part of Debian 'wordnet-base')")
    target = (cache_dir or default_cache_dir())
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        link = target / item.name
        if item.is_file() and not link.exists():
            # A copy (28 MB, once): NLTK 3.10 refuses symlinks and hard links that lead outside its root.
            shutil.copyfile(item, link)
    lexnames = target / "lexnames"
    if not lexnames.exists():
        lexnames.write_text(_lexnames_from_man_page(man_page))
    return target


_READER = None


def load_wordnet(cache_dir: Path | None = None):
    """NLTK WordNet reader over the offline Debian data; raises ``WordNetUnavailable`` with the reason."""
    global _READER
    if _READER is not None:
        return _READER
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    folder = prepare_wordnet_dir(cache_dir)
    # NLTK 3.10 only opens corpus files under its data path roots .
    root = str(folder.resolve())
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    class _EnglishWordNet30(WordNetCorpusReader):
        # The base class maps "WordNet 3.0 -> loaded version" for the multilingual OMW data by opening
        # NLTK's downloadable 'wordnet' corpus; our data IS WordNet 3.0 and METEOR is English-only.
        def map_wn(self, version="wordnet"):
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": expected, English only
        _READER = _EnglishWordNet30(str(folder), None)
    return _READER
